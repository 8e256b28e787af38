"""Teacher and student networks. Each takes ``in_channels`` and ``num_classes`` keyword
arguments, has a class attribute ``input_size`` (expected ``(H, W)``), and registers its final
classifier as its last ``nn.Linear``."""

from zskd_lightning.models.alexnet import AlexNet, AlexNetHalf
from zskd_lightning.models.lenet import LeNet5, LeNet5Half
from zskd_lightning.models.resnet import BasicBlock, CIFARResNet, ResNet18, ResNet34
from zskd_lightning.models.small import DigitsConvNet, DigitsConvNetHalf

__all__ = [
    "AlexNet",
    "AlexNetHalf",
    "BasicBlock",
    "CIFARResNet",
    "DigitsConvNet",
    "DigitsConvNetHalf",
    "LeNet5",
    "LeNet5Half",
    "ResNet18",
    "ResNet34",
]
