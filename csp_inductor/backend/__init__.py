"""The backend behind ``csp_inductor.compile``, one module per stage of a forward.

- :mod:`.install`: what ``compile`` changes on the model (attention, hooks, ``generate``,
  compiled forward and LM head), and its undo;
- :mod:`.dispatch`: what a forward is (prompt, turn, decode step), decided once, as its
  :class:`~.step.Step`, which the attention function reads (:mod:`.step`);
- :mod:`.prompt`, :mod:`.turn`: planning a prompt's and a turn's forward;
- :mod:`.room`: room for new tokens and the flex masks of forwards on the cache;
- :mod:`.bound`: the bounded cache's re-prune; :mod:`.reread`: question-agnostic scoring;
- :mod:`.layer_inputs`: what policies ranking by the layers' inputs collect;
- :mod:`.support`: which policies a model can run; :mod:`.specs`: each layer's cache;
- :mod:`.compiled_forward`, :mod:`.lm_head`: the decoder and the LM head, compiled;
- :mod:`.core`: :class:`Backend`, what the stages share.
"""

from .core import Backend

__all__ = ["Backend"]
