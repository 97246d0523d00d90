"""NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020): dilated RefineNet score networks.

All four share one layout: an input conv, stages of two residual blocks (downsampling by mean
pooling or, deeper, widening with dilation), RefineNet blocks walking back up with the skip
features, then norm, act and an output conv. NCSN conditions every normalisation on the integer
noise level; NCSNv2 is unconditional and divides its output by sigma (technique 3 of NCSNv2).
Labels are integer noise-level indices (discrete-time VE / SMLD configs).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from models.layers import divide_by_sigmas, get_act, noise_level_indices
from models.ncsn_layers import RefineBlock, ResidualBlock
from models.normalization import get_normalization
from models.utils import register_model, register_sigmas


class _Block(NamedTuple):
    out_mult: int  # output channels / nf
    resample: str | None
    dilation: int


class _Stage(NamedTuple):
    res_name: str
    refine_name: str
    blocks: tuple[_Block, _Block]


def _stage(res_name: str, refine_name: str, out_mult: int, resample: str | None = "down",
           dilation: int = 1) -> _Stage:
    """A stage: a (possibly downsampling or dilated) block, then a plain one at the same width."""
    return _Stage(res_name, refine_name,
                  (_Block(out_mult, resample, dilation), _Block(out_mult, None, dilation)))


class _DilatedRefineNet(nn.Module):
    """The shared NCSN/NCSNv2 body built from a list of stages, shallow to deep.

    Refine blocks run deep to shallow; the block of stage i fuses that stage's features with
    the deeper refined map and outputs the channel count of stage i - 1 (nf for the first).
    Submodules are registered in name order (res*, then refine*), as in the score-SDE port.
    """

    def __init__(self, config, stages: list[_Stage], conditional: bool):
        super().__init__()
        self.centered = config.data.centered
        self.conditional = conditional
        self.norm = get_normalization(config, conditional=conditional)
        self.nf = nf = config.model.nf
        self.act = act = get_act(config)
        channels = config.data.num_channels
        self.begin_conv = nn.Conv2d(channels, nf, 3, stride=1, padding=1)
        self.normalizer = self.norm(nf)
        self.end_conv = nn.Conv2d(nf, channels, 3, stride=1, padding=1)

        widths = [nf]
        res_blocks, refine_blocks = {}, {}
        for stage in stages:
            blocks = []
            for block in stage.blocks:
                out_ch = nf * block.out_mult
                blocks.append(ResidualBlock(widths[-1], out_ch, self.norm, act,
                                            resample=block.resample, dilation=block.dilation))
                widths.append(out_ch)
            res_blocks[stage.res_name] = nn.ModuleList(blocks)
        stage_widths = widths[2::2]  # output width of each stage
        refined_width = None
        for i in reversed(range(len(stages))):
            deepest = refined_width is None
            in_planes = [stage_widths[i]] if deepest else [stage_widths[i], refined_width]
            out_ch = stage_widths[i] if deepest else (stage_widths[i - 1] if i > 0 else nf)
            refine_blocks[stages[i].refine_name] = RefineBlock(
                in_planes, out_ch, act, self.norm if conditional else None, start=deepest,
                end=i == 0)
            refined_width = out_ch
        for name in sorted(res_blocks):
            self.add_module(name, res_blocks[name])
        for name in sorted(refine_blocks):
            self.add_module(name, refine_blocks[name])
        self.stage_names = [(stage.res_name, stage.refine_name) for stage in stages]

    def _features(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The network output before any sigma scaling."""
        h = x if self.centered else 2 * x - 1.0
        h = self.begin_conv(h)
        skips = []
        for res_name, _ in self.stage_names:
            for block in getattr(self, res_name):
                h = block(h, y)
            skips.append(h)
        refined = None
        for (_, refine_name), skip in zip(reversed(self.stage_names), reversed(skips)):
            inputs = [skip] if refined is None else [skip, refined]
            refined = getattr(self, refine_name)(inputs, skip.shape[2:], y)
        h = self.normalizer(refined) if y is None else self.normalizer(refined, y)
        return self.end_conv(self.act(h))


class _NCSNv2Base(_DilatedRefineNet):
    """Unconditional RefineNet whose output is divided by sigmas[label] (scale_by_sigma)."""

    def __init__(self, config, stages: list[_Stage]):
        super().__init__(config, stages, conditional=False)
        register_sigmas(self, config)
        self.scale_by_sigma = bool(getattr(config.model, "scale_by_sigma", True))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self._features(x, None)
        return divide_by_sigmas(h, self.sigmas, y) if self.scale_by_sigma else h


@register_model(name="ncsnv2_64")
class NCSNv2(_NCSNv2Base):
    """NCSNv2 for images up to 64x64: nf, 2nf (down), 2nf (dilation 2), 2nf (dilation 4)."""

    def __init__(self, config):
        super().__init__(config, [
            _stage("res1", "refine4", 1, resample=None),
            _stage("res2", "refine3", 2),
            _stage("res3", "refine2", 2, dilation=2),
            _stage("res4", "refine1", 2, dilation=4),
        ])


@register_model(name="ncsnv2_128")
class NCSNv2Deeper(_NCSNv2Base):
    """NCSNv2 for 96-128 px: nf, 2nf (down), 2nf (down), 4nf (dilation 2), 4nf (dilation 4)."""

    def __init__(self, config):
        super().__init__(config, [
            _stage("res1", "refine5", 1, resample=None),
            _stage("res2", "refine4", 2),
            _stage("res3", "refine3", 2),
            _stage("res4", "refine2", 4, dilation=2),
            _stage("res5", "refine1", 4, dilation=4),
        ])


@register_model(name="ncsnv2_256")
class NCSNv2Deepest(_NCSNv2Base):
    """NCSNv2 for 129-256 px: NCSNv2Deeper with one more 2x downsampling stage (`res31`)."""

    def __init__(self, config):
        super().__init__(config, [
            _stage("res1", "refine5", 1, resample=None),
            _stage("res2", "refine4", 2),
            _stage("res3", "refine3", 2),
            _stage("res31", "refine31", 2),
            _stage("res4", "refine2", 4, dilation=2),
            _stage("res5", "refine1", 4, dilation=4),
        ])


# Names of the score-SDE port.
NCSNv2_128 = NCSNv2Deeper
NCSNv2_256 = NCSNv2Deepest


@register_model(name="ncsn")
class NCSN(_DilatedRefineNet):
    """NCSN (v1): the 64px layout with conditional InstanceNorm++ everywhere, no sigma scaling.

    Each normalisation learns one affine set per noise level (config.model.num_scales levels).
    """

    def __init__(self, config):
        super().__init__(config, [
            _stage("res1", "refine4", 1, resample=None),
            _stage("res2", "refine3", 2),
            _stage("res3", "refine2", 2, dilation=2),
            _stage("res4", "refine1", 2, dilation=4),
        ], conditional=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._features(x, noise_level_indices(y))
