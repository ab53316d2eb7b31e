"""The networks: torchvision-layout DenseNet and ResNet with the names and keys the references use."""
