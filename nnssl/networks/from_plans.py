"""Networks built from a configuration's plans: the plans' own network and a residual-encoder U-Net of the same
geometry.

``configuration_manager`` is nnU-Net's ``ConfigurationManager`` (or anything with ``network_arch_class_name``,
``network_arch_init_kwargs`` and ``network_arch_init_kwargs_req_import``). The networks return logits
``(B, K, *patch)``, or with deep supervision a list of logits, highest resolution first.
"""

from __future__ import annotations

import copy

from torch import nn

RESIDUAL_ENCODER_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
# nnU-Net's ResEnc presets (ResidualEncoderUNetPlanner): ResNet-34-like 3, 4, 6 blocks after a 1-block stem stage
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)


def _network_from_plans(arch_class_name: str, arch_kwargs: dict, configuration_manager, num_input_channels: int,
                        num_output_channels: int, deep_supervision: bool) -> nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(arch_class_name, arch_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import, num_input_channels,
                                  num_output_channels, allow_init=True, deep_supervision=deep_supervision)


def build_plans_network(configuration_manager, num_input_channels: int, num_output_channels: int,
                        deep_supervision: bool) -> nn.Module:
    """The configuration's own network (its ``network_arch_class_name`` and kwargs, nnU-Net's initialisation), as
    ``nnUNetTrainer.build_network_architecture`` builds it."""
    return _network_from_plans(configuration_manager.network_arch_class_name,
                               configuration_manager.network_arch_init_kwargs, configuration_manager,
                               num_input_channels, num_output_channels, deep_supervision)


def residual_encoder_kwargs(arch_kwargs: dict) -> dict:
    """``ResidualEncoderUNet`` arguments with the same stages, strides, kernels and feature widths as a
    ``PlainConvUNet``'s plans (so both produce deep-supervision outputs of the same shapes), and the encoder
    blocks of nnU-Net's ResEnc presets."""
    kwargs = copy.deepcopy(arch_kwargs)
    kwargs.pop("n_conv_per_stage", None)
    kwargs["n_blocks_per_stage"] = list(RESENC_BLOCKS_PER_STAGE[:kwargs["n_stages"]])
    return kwargs


def build_residual_encoder_unet(configuration_manager, num_input_channels: int, num_output_channels: int,
                                deep_supervision: bool) -> nn.Module:
    """A residual-encoder U-Net built from the configuration's (plain U-Net) plans."""
    return _network_from_plans(RESIDUAL_ENCODER_UNET,
                               residual_encoder_kwargs(configuration_manager.network_arch_init_kwargs),
                               configuration_manager, num_input_channels, num_output_channels, deep_supervision)
