"""The LRP engine, apart from the model definitions, training and the tools.

Shared by every architecture: ``output`` (what each map explains), ``rules`` (BatchNorm folds,
transposed convolutions, the input layer), the elementwise ops (``torch_ops``, ``triton_ops``
over the kernels of ``isnet_fast.kernels``, ``functions``). One subpackage per architecture
reads a network into a plan and walks it: ``densenet`` and ``resnet`` (``plan``, the forward
that keeps the activations, the fused ``relevance`` pass, and a slow ``reference`` for tests).
"""


class UnsupportedModelError(ValueError):
    """The model does not have the structure ISNet's relevance pass needs."""
