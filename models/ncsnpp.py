"""NCSN++ / DDPM++ score network (Song et al., ICLR 2021, section 4.4 and appendix H).

A U-Net of residual blocks with optional attention, FIR or plain resampling, optional progressive
input/output pyramids and a noise-level embedding (Gaussian Fourier features of log sigma, or the
sinusoidal embedding of the time label). All layers sit in one flat `all_modules` ModuleList in
the order of the original implementation, so its checkpoints load key for key.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

import sde_lib
import subspace_lib
from models import layerspp
from models.layers import dense, get_act, get_timestep_embedding
from models.utils import register_model, register_sigmas

_PROGRESSIVE = ("none", "output_skip", "residual")
_PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
_EMBEDDINGS = ("fourier", "positional")
_RESBLOCKS = ("ddpm", "biggan")
_COMBINE = ("sum", "cat")


def _option(value: str, allowed: tuple[str, ...], field: str) -> str:
    value = str(value).lower()
    if value not in allowed:
        raise ValueError(f"config.model.{field} is '{value}'; it must be one of {list(allowed)}.")
    return value


@register_model(name="ncsnpp")
class NCSNpp(nn.Module):
    """NCSN++ (VE, Fourier embedding, FIR) and DDPM++ (VP, positional embedding) networks.

    forward(x, time_cond): x is [B, C, H, W]; time_cond is sigma(t) for Fourier embeddings or the
    time label (e.g. 999 t) for positional ones. With `scale_by_sigma` the output is divided by
    sigma (eq. 6 of the NCSN++ appendix: the network models sigma * score).

    `config.model.gaussian_dc` (continuous VP / sub-VP only; off in every original config) models
    the noise in the image's per-channel mean (the DC band, one coordinate per channel)
    analytically: the network's output loses its DC, which is replaced by the best prediction of
    the DC noise under a Gaussian model of the data's DC coordinates,
    sde_lib.gaussian_noise_prediction with the buffers `dc_mean` [C] and `dc_cov` [C, C] (set from
    the training data by `run_lib.set_dc_statistics`); the output conv has no bias then, since
    the replacement would cancel it. Its gain follows the noise level, from
    about 0 where the data's colour dominates x_t to 1 at pure noise; a small network conditioned
    additively on time learns a gain that barely changes with t instead, and its samples' colours
    blow up (`python -m analysis.bands` measures this; docs/demo.md).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        model = config.model
        self.act = act = get_act(config)
        register_sigmas(self, config)
        self.gaussian_dc = bool(model.get("gaussian_dc", False))
        if self.gaussian_dc:
            if (str(config.training.sde).lower() not in ("vpsde", "subvpsde")
                    or not config.training.continuous):
                raise ValueError("config.model.gaussian_dc needs a continuous VP or sub-VP "
                                 "SDE (a network that predicts the noise); turn it off.")
            self._sde = sde_lib.get_sde(config)[0]
            channels = config.data.num_channels
            self.register_buffer("dc_mean", torch.zeros(channels, dtype=torch.float64))
            # A standard normal until `run_lib.train` sets the training data's statistics.
            self.register_buffer("dc_cov", torch.eye(channels, dtype=torch.float64))
        # The output conv's bias would add a constant per channel, which the DC replacement
        # removes again. Kept, its gradient would be zero up to float rounding, and Adam would
        # scale that rounding noise into steps of about lr (a random walk that differs between
        # batch layouts, e.g. one process and several). With the Gaussian DC it does not exist.
        output_bias = not self.gaussian_dc

        self.nf = nf = model.nf
        ch_mult = tuple(model.ch_mult)
        self.num_res_blocks = num_res_blocks = model.num_res_blocks
        self.attn_resolutions = attn_resolutions = tuple(model.attn_resolutions)
        self.num_resolutions = num_resolutions = len(ch_mult)
        image_size = config.data.image_size
        if image_size % 2 ** (num_resolutions - 1) != 0:
            raise ValueError(f"data.image_size {image_size} must be divisible by "
                             f"2**(len(ch_mult) - 1) = {2 ** (num_resolutions - 1)}.")
        self.all_resolutions = [image_size // 2 ** i for i in range(num_resolutions)]
        # Attention placement is fixed by the configured size (the original decided it per call
        # from the feature-map width, which agrees whenever the input has that size).
        self._attn_at_level = [res in attn_resolutions for res in self.all_resolutions]

        self.conditional = conditional = model.conditional
        fir = model.fir
        fir_kernel = tuple(model.fir_kernel)
        self.skip_rescale = skip_rescale = model.skip_rescale
        self.resblock_type = resblock_type = _option(model.resblock_type, _RESBLOCKS,
                                                     "resblock_type")
        self.progressive = progressive = _option(model.progressive, _PROGRESSIVE, "progressive")
        self.progressive_input = progressive_input = _option(
            model.progressive_input, _PROGRESSIVE_INPUT, "progressive_input")
        self.embedding_type = embedding_type = _option(model.embedding_type, _EMBEDDINGS,
                                                       "embedding_type")
        combine_method = _option(model.progressive_combine, _COMBINE, "progressive_combine")
        self.centered = config.data.centered
        self.scale_by_sigma = model.scale_by_sigma
        init_scale = model.init_scale
        dropout = model.dropout
        resamp_with_conv = model.resamp_with_conv
        channels = config.data.num_channels
        temb_dim = nf * 4

        modules: list[nn.Module] = []
        if embedding_type == "fourier":
            if not config.training.continuous:
                raise ValueError("Fourier noise embeddings need continuous training: set "
                                 "training.continuous = True or embedding_type = 'positional'.")
            modules.append(layerspp.GaussianFourierProjection(embedding_size=nf,
                                                              scale=model.fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        if conditional:
            modules.append(dense(embed_dim, temb_dim))
            modules.append(dense(temb_dim, temb_dim))

        attn_block = functools.partial(layerspp.AttnBlockpp, init_scale=init_scale,
                                       skip_rescale=skip_rescale)
        upsample = functools.partial(layerspp.Upsample, with_conv=resamp_with_conv, fir=fir,
                                     fir_kernel=fir_kernel)
        downsample = functools.partial(layerspp.Downsample, with_conv=resamp_with_conv, fir=fir,
                                       fir_kernel=fir_kernel)
        # Parameter-free pyramid resamplers are attributes outside `all_modules`; the residual
        # variants carry a convolution and are listed.
        if progressive == "output_skip":
            self.pyramid_upsample = layerspp.Upsample(fir=fir, fir_kernel=fir_kernel,
                                                      with_conv=False)
        pyramid_upsample = functools.partial(layerspp.Upsample, fir=fir, fir_kernel=fir_kernel,
                                             with_conv=True)
        if progressive_input == "input_skip":
            self.pyramid_downsample = layerspp.Downsample(fir=fir, fir_kernel=fir_kernel,
                                                          with_conv=False)
        pyramid_downsample = functools.partial(layerspp.Downsample, fir=fir,
                                               fir_kernel=fir_kernel, with_conv=True)
        if resblock_type == "ddpm":
            resnet_block = functools.partial(layerspp.ResnetBlockDDPMpp, act=act,
                                             dropout=dropout, init_scale=init_scale,
                                             skip_rescale=skip_rescale, temb_dim=temb_dim)
        else:
            resnet_block = functools.partial(layerspp.ResnetBlockBigGANpp, act=act,
                                             dropout=dropout, fir=fir, fir_kernel=fir_kernel,
                                             init_scale=init_scale, skip_rescale=skip_rescale,
                                             temb_dim=temb_dim)

        # Downsampling path.
        input_pyramid_ch = channels
        modules.append(layerspp.conv3x3(channels, nf))
        hs_c = [nf]
        in_ch = nf
        for i_level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[i_level]
                modules.append(resnet_block(in_ch=in_ch, out_ch=out_ch))
                in_ch = out_ch
                if self._attn_at_level[i_level]:
                    modules.append(attn_block(channels=in_ch))
                hs_c.append(in_ch)
            if i_level != num_resolutions - 1:
                if resblock_type == "ddpm":
                    modules.append(downsample(in_ch=in_ch))
                else:
                    modules.append(resnet_block(down=True, in_ch=in_ch))
                if progressive_input == "input_skip":
                    modules.append(layerspp.Combine(dim1=input_pyramid_ch, dim2=in_ch,
                                                    method=combine_method))
                    if combine_method == "cat":
                        in_ch *= 2
                elif progressive_input == "residual":
                    modules.append(pyramid_downsample(in_ch=input_pyramid_ch, out_ch=in_ch))
                    input_pyramid_ch = in_ch
                hs_c.append(in_ch)

        # Bottleneck.
        in_ch = hs_c[-1]
        modules.append(resnet_block(in_ch=in_ch))
        modules.append(attn_block(channels=in_ch))
        modules.append(resnet_block(in_ch=in_ch))

        # Upsampling path.
        pyramid_ch = 0
        for i_level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[i_level]
                modules.append(resnet_block(in_ch=in_ch + hs_c.pop(), out_ch=out_ch))
                in_ch = out_ch
            if self._attn_at_level[i_level]:
                modules.append(attn_block(channels=in_ch))
            if progressive != "none":
                top = i_level == num_resolutions - 1
                if progressive == "output_skip":
                    modules.append(layerspp.group_norm(in_ch))
                    if top:
                        modules.append(layerspp.conv3x3(in_ch, channels, bias=output_bias,
                                                        init_scale=init_scale))
                    else:
                        modules.append(layerspp.conv3x3(in_ch, channels, bias=True,
                                                        init_scale=init_scale))
                    pyramid_ch = channels
                elif top:
                    modules.append(layerspp.group_norm(in_ch))
                    modules.append(layerspp.conv3x3(in_ch, in_ch, bias=True))
                    pyramid_ch = in_ch
                else:
                    modules.append(pyramid_upsample(in_ch=pyramid_ch, out_ch=in_ch))
                    pyramid_ch = in_ch
            if i_level != 0:
                if resblock_type == "ddpm":
                    modules.append(upsample(in_ch=in_ch))
                else:
                    modules.append(resnet_block(in_ch=in_ch, up=True))
        assert not hs_c

        if progressive != "output_skip":
            modules.append(layerspp.group_norm(in_ch))
            modules.append(layerspp.conv3x3(in_ch, channels, bias=output_bias,
                                            init_scale=init_scale))

        self.all_modules = nn.ModuleList(modules)

    def set_dc_statistics(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        """Set the mean [C] and covariance [C, C] of the training data's orthonormal DC
        coordinates (scaled data, `subspace_lib.downsample` to 1x1) for `gaussian_dc`."""
        if not self.gaussian_dc:
            raise ValueError("This network has no Gaussian DC model (config.model."
                             "gaussian_dc is off).")
        self.dc_mean.copy_(torch.as_tensor(mean, dtype=torch.float64).reshape(-1))
        self.dc_cov.copy_(torch.as_tensor(cov, dtype=torch.float64).reshape(self.dc_cov.shape))

    def _gaussian_dc(self, x: torch.Tensor, time_cond: torch.Tensor) -> torch.Tensor:
        """The Gaussian DC noise prediction lifted to the image (constant per channel)."""
        k = subspace_lib.num_halvings(x.shape[-1], 1)
        dc = subspace_lib.downsample(x, k).flatten(1)
        t = self._sde.label_to_time(time_cond)
        z_dc = sde_lib.gaussian_noise_prediction(self._sde, dc, t, self.dc_mean, self.dc_cov)
        return subspace_lib.upsample(z_dc.to(x.dtype).reshape(*dc.shape, 1, 1), k)

    def forward(self, x: torch.Tensor, time_cond: torch.Tensor) -> torch.Tensor:
        """The network output for images x [B, C, H, W] at noise levels / labels time_cond [B]."""
        if time_cond.dim() == 0:
            time_cond = time_cond.expand(x.shape[0])
        dc_noise = self._gaussian_dc(x, time_cond) if self.gaussian_dc else None
        modules = iter(self.all_modules)

        if self.embedding_type == "fourier":
            used_sigmas = time_cond
            temb = next(modules)(torch.log(used_sigmas))
        else:
            # Discrete labels index the noise levels (truncated, as in the original).
            used_sigmas = self.sigmas[time_cond.int()] if self.scale_by_sigma else None
            temb = get_timestep_embedding(time_cond, self.nf)
        if self.conditional:
            temb = next(modules)(temb)
            temb = next(modules)(self.act(temb))
        else:
            temb = None

        if not self.centered:
            x = 2 * x - 1.0  # the network works on [-1, 1] inputs

        input_pyramid = x if self.progressive_input != "none" else None
        hs = [next(modules)(x)]
        for i_level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = next(modules)(hs[-1], temb)
                if self._attn_at_level[i_level]:
                    h = next(modules)(h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                if self.resblock_type == "ddpm":
                    h = next(modules)(hs[-1])
                else:
                    h = next(modules)(hs[-1], temb)
                if self.progressive_input == "input_skip":
                    input_pyramid = self.pyramid_downsample(input_pyramid)
                    h = next(modules)(input_pyramid, h)
                elif self.progressive_input == "residual":
                    input_pyramid = layerspp.skip_sum(next(modules)(input_pyramid), h,
                                                      self.skip_rescale)
                    h = input_pyramid
                hs.append(h)

        h = hs[-1]
        h = next(modules)(h, temb)
        h = next(modules)(h)
        h = next(modules)(h, temb)

        pyramid = None
        for i_level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb)
            if self._attn_at_level[i_level]:
                h = next(modules)(h)
            if self.progressive != "none":
                if i_level == self.num_resolutions - 1:
                    pyramid = self.act(next(modules)(h))
                    pyramid = next(modules)(pyramid)
                elif self.progressive == "output_skip":
                    pyramid = self.pyramid_upsample(pyramid)
                    pyramid_h = self.act(next(modules)(h))
                    pyramid = pyramid + next(modules)(pyramid_h)
                else:
                    pyramid = layerspp.skip_sum(next(modules)(pyramid), h, self.skip_rescale)
                    h = pyramid
            if i_level != 0:
                if self.resblock_type == "ddpm":
                    h = next(modules)(h)
                else:
                    h = next(modules)(h, temb)
        assert not hs

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = self.act(next(modules)(h))
            h = next(modules)(h)
        assert next(modules, None) is None, "module list and forward pass are out of step"

        if self.scale_by_sigma:
            # Positional models divide by the float64 table entry; the result keeps h's dtype.
            h = (h / used_sigmas.reshape(x.shape[0], *([1] * (h.dim() - 1)))).to(h.dtype)
        if dc_noise is not None:
            k = subspace_lib.num_halvings(h.shape[-1], 1)
            h = h - subspace_lib.upsample(subspace_lib.downsample(h, k), k) + dc_noise
        return h
