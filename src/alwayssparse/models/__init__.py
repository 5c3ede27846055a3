"""Model definitions used for sparse-training experiments."""

from alwayssparse.models.bert import BERT_PRESETS, BertConfig, BertForPreTraining, bert_config
from alwayssparse.models.resnet import RESNET_PRESETS, ResNet, ResNetConfig, build_resnet
from alwayssparse.models.transformer import TransformerLM, TransformerLMConfig, lm_loss
from alwayssparse.models.transformer_xl import (
    TRANSFORMER_XL_PRESETS,
    TransformerXL,
    TransformerXLConfig,
    count_parameters,
)

__all__ = [
    "BERT_PRESETS",
    "RESNET_PRESETS",
    "TRANSFORMER_XL_PRESETS",
    "BertConfig",
    "BertForPreTraining",
    "ResNet",
    "ResNetConfig",
    "TransformerLM",
    "TransformerLMConfig",
    "TransformerXL",
    "TransformerXLConfig",
    "bert_config",
    "build_resnet",
    "count_parameters",
    "lm_loss",
]
