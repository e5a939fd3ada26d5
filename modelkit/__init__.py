"""The bundled model's kit: the problems it is trained on and evaluated with, and the scripts that build models.

- ``arithmetic``: seeded multi-step word problems with Marco-o1-format solutions, and training examples with a
  slip, a reflection and a redo (held-out seeds from 1,000,000);
- ``train``: trains a model until its dev loss stops improving (``make model``: the bundled ``models/forest-arith``);
- ``make_model``: the shared tokenizer trainer and ``forest make-model --tiny-random`` (a random-weight Qwen2).
"""

__all__ = ["arithmetic", "make_model", "train"]
