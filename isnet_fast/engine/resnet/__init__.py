"""The ResNet ISNet: the plan of a ResNet, its forward pass and the fused relevance pass."""
