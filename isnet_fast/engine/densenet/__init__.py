"""The DenseNet ISNet: the plan of a DenseNet, its forward pass and the fused relevance pass."""
