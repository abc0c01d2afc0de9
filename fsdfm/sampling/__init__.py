"""Sampler knobs and the training-free samplers of the field (confidence-ordered unmasking, threshold decoding,
ReMDM remasking, semi-AR blocks, greedy-tail, temperature, top-p), on top of the DFM sampling loop
(fsdfm.samplers). Importing the package registers the new samplers as update rules."""

from fsdfm.sampling.knobs import SamplerKnobs, knob_errors
from fsdfm.sampling.loop import WHOLE_STEP, sample_with_knobs

__all__ = ["WHOLE_STEP", "SamplerKnobs", "knob_errors", "sample_with_knobs"]
