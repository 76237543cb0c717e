"""The LCKD network: a shared encoder applied to each MRI modality, a shared decoder over the
modalities' concatenated features, and the cross-modal distillation term.

Reads top to bottom: layers -> encoder (3D ResNet + ASPP) -> decoder -> config -> LCKD.
Tensors are (B, C, D, H, W); "/2,/4,/4" means a map of size (D/2, H/4, W/4).
Published implementation: github.com/billhhh/LCKD (DualNet.py, and Res50.py as in the authors'
ShaSpec repository).
Layer for layer the same network and parameter count; the differences are in how it is run
(only available modalities are encoded, the all-zero image once per forward) and are listed in
the LCKD docstring.
"""
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# What the sides of a patch / sliding window must divide by.
PATCH_MULTIPLES = (16, 32, 32)
MULTIPLES_RULE = "D must be a multiple of 16 and H, W of 32 (the encoder halves D 4 times and H, W 5 times)"


def patch_fits(d, h, w):
    """Whether the encoder takes a patch (D, H, W) of these sides (MULTIPLES_RULE)."""
    return all(n % m == 0 for n, m in zip((d, h, w), PATCH_MULTIPLES))

# ----------------------------------------------------------------------------------------------
# Layers


class WSConv3d(nn.Conv3d):
    """Weight-standardised 3D convolution (published `Conv3d_wd`).

    Each output filter w is used as (w - mean(w)) / sqrt(var(w) + 1e-12), with the unbiased
    variance over the filter's in_channels x kernel elements, exactly as published. The
    standardisation is computed in fp32 even under autocast: a bf16/fp16 variance of a few
    thousand weights loses most of its digits, and the result is only then cast by the conv.
    It is recomputed at every call because the weights change at every step (and autograd
    must see it); one var_mean pass gives both statistics, in any memory format.
    """

    def forward(self, x):
        w = self.weight.float()
        var, mean = torch.var_mean(w, dim=(1, 2, 3, 4), keepdim=True)
        return self._conv_forward(x, ((w - mean) / torch.sqrt(var + 1e-12)).to(self.weight.dtype), self.bias)


class InstanceNorm3d(nn.InstanceNorm3d):
    """Affine InstanceNorm that also accepts maps with a single spatial element.

    PyTorch refuses those ("Expected more than 1 spatial element", in train AND eval when no
    running statistics are kept); the published code asked users to delete that check from
    PyTorch. The formula itself is well defined: (x - mean) / sqrt(var + eps) of one element is
    0, so the output is the affine bias. We evaluate that formula with ordinary tensor ops, so
    the result is the published one, and the layers feeding it get an exact zero gradient
    rather than none (every parameter takes part in the graph, which DDP requires).
    """

    def forward(self, x):
        if x.shape[2:].numel() > 1:
            return super().forward(x)
        mean = x.mean(dim=(2, 3, 4), keepdim=True)
        var = x.var(dim=(2, 3, 4), keepdim=True, correction=0)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)
        return y.to(x.dtype)


def conv(cfg, c_in, c_out, kernel_size, stride=1, padding=0, dilation=1):
    """Bias-free conv, weight-standardised when cfg.weight_std (all encoder/decoder convs)."""
    cls = WSConv3d if cfg.weight_std else nn.Conv3d
    return cls(c_in, c_out, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False)


def norm(cfg, channels):
    return InstanceNorm3d(channels, affine=True) if cfg.norm == "IN" else nn.BatchNorm3d(channels)


def act(cfg):
    if cfg.activation == "LeakyReLU":
        return nn.LeakyReLU(0.01, inplace=True)
    return nn.ReLU(inplace=True)


def conv_norm_act(cfg, c_in, c_out, kernel_size, **conv_args):
    return nn.Sequential(conv(cfg, c_in, c_out, kernel_size, **conv_args), norm(cfg, c_out), act(cfg))


class Bottleneck(nn.Module):
    """ResNet bottleneck 1x1 -> 3x3x3 (strided) -> 1x1 (x4 channels), plus the shortcut.

    The first block of every stage changes the channel count, so it carries the projection
    shortcut (1x1 conv + norm), as in the published 'B' shortcut.
    """

    expansion = 4

    def __init__(self, cfg, c_in, width, stride=1):
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(
            conv_norm_act(cfg, c_in, width, 1),
            conv_norm_act(cfg, width, width, 3, stride=stride, padding=1),
            conv(cfg, width, c_out, 1),
            norm(cfg, c_out),
        )
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(cfg, c_in, c_out, 1, stride=stride), norm(cfg, c_out))
        self.act = act(cfg)

    def forward(self, x):
        residual = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.body(x) + residual)


class BasicBlock(nn.Module):
    """Residual block of two 3x3x3 convs at constant width (the decoder's refinement block)."""

    def __init__(self, cfg, channels):
        super().__init__()
        self.body = nn.Sequential(
            conv_norm_act(cfg, channels, channels, 3, padding=1),
            conv(cfg, channels, channels, 3, padding=1),
            norm(cfg, channels),
        )
        self.act = act(cfg)

    def forward(self, x):
        return self.act(self.body(x) + x)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling, C -> C channels at the same size.

    Branches: 1x1; 3x3x3 with each dilation; image level (global mean -> 1x1 conv -> norm ->
    act -> broadcast). With InstanceNorm the image-level branch normalises a 1x1x1 map, so its
    output is act(norm.bias): a learnable per-channel constant, whatever the input (published
    maths, see InstanceNorm3d). Its 1x1 conv is kept (and counted, as published) although it
    cannot influence the output. With BatchNorm the branch is input dependent as usual.
    """

    def __init__(self, cfg, channels):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_norm_act(cfg, channels, channels, 1)]
            + [conv_norm_act(cfg, channels, channels, 3, padding=d, dilation=d) for d in cfg.aspp_dilations]
        )
        self.image_branch = conv_norm_act(cfg, channels, channels, 1)
        self.fuse = conv_norm_act(cfg, channels * (len(self.branches) + 1), channels, 1)

    def forward(self, x):
        image = self.image_branch(x.mean(dim=(2, 3, 4), keepdim=True)).expand(-1, -1, *x.shape[2:])
        return self.fuse(torch.cat([branch(x) for branch in self.branches] + [image], dim=1))


# ----------------------------------------------------------------------------------------------
# Encoder


class Encoder(nn.Module):
    """Shared single-modality encoder: 3D ResNet, 1x1 reduction, ASPP.

    (B, 1, D, H, W) -> deep feature (B, deep_channels, /16,/32,/32) and skips
    [s0 (B, w0, D,/2,/2), s1 (B, 4*w0, /2,/4,/4), s2 (B, 4*w1, /4,/8,/8), s3 (B, 4*w2, /8,/16,/16)].
    Published widths w = (64, 128, 256, 320): skips of 64, 256, 512, 1024 ch; last stage 1280 ch.
    """

    def __init__(self, cfg):
        super().__init__()
        w0 = cfg.widths[0]
        self.stem = conv_norm_act(cfg, 1, w0, 7, stride=(1, 2, 2), padding=3)
        stages, c_in = [], w0
        for i, (blocks, width) in enumerate(zip(cfg.blocks, cfg.widths)):
            layers = [nn.MaxPool3d(3, stride=2, padding=1)] if i == 0 else []
            layers.append(Bottleneck(cfg, c_in, width, stride=1 if i == 0 else 2))
            c_in = width * Bottleneck.expansion
            layers += [Bottleneck(cfg, c_in, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(conv_norm_act(cfg, c_in, cfg.deep_channels, 1), ASPP(cfg, cfg.deep_channels))
        self.checkpoint = cfg.checkpoint_encoder

    def _run(self, module, x):
        if self.checkpoint and torch.is_grad_enabled():
            # Recompute this stage's activations in backward instead of storing them.
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward(self, x, num_deep=None):
        """Encode x; only its first `num_deep` images (default all) get the deep feature.

        Images after num_deep need only their skips (the all-zero image), which saves the last
        stage and the ASPP for them. Exact only with per-image normalisation (IN, or BN in
        eval), which is when the caller uses it.
        """
        skips = [self._run(self.stem, x)]
        for stage in self.stages[:-1]:
            skips.append(self._run(stage, skips[-1]))
        deep = skips[-1] if num_deep is None else skips[-1][:num_deep]
        deep = self._run(self.head, self._run(self.stages[-1], deep))
        return deep, skips


# ----------------------------------------------------------------------------------------------
# Decoder


class Decoder(nn.Module):
    """Shared decoder over the M modalities' concatenated features.

    deep (N, M*deep_channels, /16,/32,/32) and skips [s0..s3], each (N, M*C_i, ...) with the
    modalities' channels in modality order -> logits (N, num_classes, D, H, W). Four up-stages:
    transposed conv 2x2x2 stride 2 + (skip -> 1x1 conv + norm + act), summed, then a residual
    BasicBlock; then a 1x1 conv to the classes and trilinear upsampling x(1, 2, 2).
    As published, the transposed convs and the classifier are plain (not weight-standardised).
    """

    def __init__(self, cfg):
        super().__init__()
        m = cfg.in_modalities
        skip_channels = [4 * w for w in cfg.widths[2::-1]] + [cfg.widths[0]]  # s3, s2, s1, s0
        c_in = [m * cfg.deep_channels, *cfg.decoder_channels[:-1]]
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(ci, co, 2, stride=2, bias=False) for ci, co in zip(c_in, cfg.decoder_channels)
        )
        self.skip = nn.ModuleList(
            conv_norm_act(cfg, m * cs, co, 1) for cs, co in zip(skip_channels, cfg.decoder_channels)
        )
        self.blocks = nn.ModuleList(BasicBlock(cfg, co) for co in cfg.decoder_channels)
        self.classifier = nn.Conv3d(cfg.decoder_channels[-1], cfg.num_classes, 1, bias=False)

    def forward(self, deep, skips):
        x = deep
        for up, project, block, skip in zip(self.up, self.skip, self.blocks, reversed(skips)):
            x = block(up(x) + project(skip))
        return F.interpolate(self.classifier(x), scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------
# Config and network


# The choices of the scripts' model flags (--model_size, --norm_cfg, --activation_cfg).
MODEL_SIZES = ("full", "small")  # LCKDConfig.from_name
NORMS = ("IN", "BN")
ACTIVATIONS = ("LeakyReLU", "ReLU")


@dataclass
class LCKDConfig:
    """Network configuration; the defaults are the published network (43.66 M parameters)."""

    in_modalities: int = 4
    num_classes: int = 3  # ET, WT, TC logits
    blocks: tuple = (3, 4, 6, 3)  # ResNet-50
    widths: tuple = (64, 128, 256, 320)  # bottleneck widths; stage outputs are 4x
    deep_channels: int = 256  # 1x1 reduction and ASPP width: the distilled deep feature
    aspp_dilations: tuple = (2, 4, 8)
    decoder_channels: tuple = (256, 128, 64, 32)  # up-stages from /16,/32,/32 to D,/2,/2
    weight_std: bool = True
    norm: str = "IN"  # "IN" (affine InstanceNorm) or "BN"
    activation: str = "LeakyReLU"  # LeakyReLU(0.01) or "ReLU"
    checkpoint_encoder: bool = False  # activation checkpointing of the encoder stages
    encode_all: bool = False  # encode all M modalities per forward, as published (same results)

    def __post_init__(self):
        for name in ("blocks", "widths", "aspp_dilations", "decoder_channels"):
            setattr(self, name, tuple(getattr(self, name)))  # lists from a saved JSON config
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not len(self.blocks) == len(self.widths) == len(self.decoder_channels) == 4:
            raise ValueError("blocks, widths and decoder_channels need one entry per stage (4)")

    @classmethod
    def small(cls, **overrides):
        """Narrow one-block-per-stage variant for CPU tests and the demo (same code path)."""
        return replace(
            cls(widths=(8, 16, 32, 40), blocks=(1, 1, 1, 1), deep_channels=32, decoder_channels=(32, 16, 16, 8)),
            **overrides,
        )

    @classmethod
    def from_name(cls, name, **overrides):
        """'full' / 'small' -> config, with field overrides."""
        if name not in MODEL_SIZES:
            raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODEL_SIZES)}")
        return (cls.small if name == "small" else cls)(**overrides)

    def to_dict(self):
        return asdict(self)


@dataclass
class Features:
    """Encoder outputs of one batch, per modality index m.

    deep[m]: (N, C, /16,/32,/32); skips[m]: [s0, s1, s2, s3], each (N, C_i, ...);
    zero_skips: the all-zero image's skips, each (1, C_i, ...), or None when not computed.
    """

    deep: dict
    skips: dict
    zero_skips: list = None


class LCKD(nn.Module):
    """LCKD: shared encoder per modality, missing-modality filling, shared decoder, distillation.

    model(x, subset, teachers) -> (logits, kd) with x (N, M, D, H, W) in MODALITIES order,
    D a multiple of 16 and H, W multiples of 32:
    * only the modalities in `subset` are read; the others count as all-zero images;
    * a missing modality's deep feature is the mean of the available ones' deep features;
      its skips are the encoder's skips of the all-zero image;
    * kd = sum over teachers t in subset and modalities s in subset, s != t, of
      mean|f_t.detach() - f_s| over (N, C, d, h, w) (the published L1Loss). The published loop
      also adds s == t; that term is 0 and so is its gradient (sign(0) = 0), so it is skipped.

    Differences from the published code, all in how the same maths is run:
    * the encoder sees only the available modalities plus ONE all-zero image (batch 1) whose
      skips are broadcast to every missing slot, instead of N*M images. Exact with
      InstanceNorm (per-image statistics) and with BatchNorm in eval. BatchNorm in training
      normalises with batch statistics, which depend on which images share the batch, so
      there we encode all M (missing ones zeroed) exactly as published;
    * the image-level ASPP branch runs without editing PyTorch (see InstanceNorm3d);
    * forward_subsets() encodes once and decodes many subsets.
    """

    def __init__(self, config=None):
        super().__init__()
        self.config = config or LCKDConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self._init_weights()

    def _init_weights(self):
        # Published initialisation: He normal (fan_out) for every conv, norms at identity.
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, (nn.InstanceNorm3d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- modality bookkeeping --------------------------------------------------------------

    def _as_subset(self, subset, allow_empty=False):
        """(0, 2) / [2, 0] -> sorted tuple of indices, validated."""
        subset = tuple(sorted({int(m) for m in subset}))
        if (not subset and not allow_empty) or any(not 0 <= m < self.config.in_modalities for m in subset):
            raise ValueError(f"invalid modality subset {subset!r} for {self.config.in_modalities} modalities")
        return subset

    def _check_input(self, x):
        modalities = self.config.in_modalities
        if x.dim() != 5 or x.shape[1] != modalities:
            raise ValueError(f"expected input (N, {modalities}, D, H, W), got {tuple(x.shape)}")
        if not patch_fits(*x.shape[2:]):
            raise ValueError(f"patch {'x'.join(map(str, x.shape[2:]))}: {MULTIPLES_RULE}")

    def _batch_statistics(self):
        """True when features depend on which images share the batch (BatchNorm in training)."""
        return self.training and self.config.norm == "BN"

    # -- the steps of a forward --------------------------------------------------------------

    def encode(self, x, modalities, zero_image):
        """Run the shared encoder on x's listed modalities (+ one all-zero image) -> Features.

        The modalities are folded into the batch: (N*k [+1], 1, D, H, W), sample-major.
        """
        n, k = x.shape[0], len(modalities)
        images = x[:, list(modalities)].reshape(n * k, 1, *x.shape[2:])
        if zero_image:
            images = torch.cat([images, images.new_zeros(1, 1, *x.shape[2:])])
        deep, skips = self.encoder(images, num_deep=n * k)

        # split + unbind rather than slicing and indexing: their backward is one concatenation
        # of the gradients, where each index view's backward would fill a zero tensor of the
        # whole encoder output (k of them per scale, then summed).
        def split(t):  # (N*k [+1], ...) -> ([k tensors (N, ...)], the zero image's (1, ...))
            body, *zero = t.split(n * k)
            return body.unflatten(0, (n, k)).unbind(1), zero[0] if zero else None

        deep_per_modality, _ = split(deep)
        skips_split = [split(s) for s in skips]
        return Features(
            deep=dict(zip(modalities, deep_per_modality)),
            skips={m: [per_modality[j] for per_modality, _ in skips_split] for j, m in enumerate(modalities)},
            zero_skips=[zero for _, zero in skips_split] if zero_image else None,
        )

    def encode_subset(self, x, subset, all_channels=False):
        """Features for one subset: the available modalities plus, if any is missing, the
        all-zero image. all_channels=True runs it the published way instead: all M channels,
        the missing ones zeroed, in one batch; needed for BatchNorm in training, whose batch
        statistics depend on which images share the batch.
        """
        m = self.config.in_modalities
        missing = [i for i in range(m) if i not in subset]
        if not all_channels:
            return self.encode(x, subset, zero_image=bool(missing))
        x = x.clone()
        x[:, missing] = 0
        feats = self.encode(x, range(m), zero_image=False)
        if missing:  # every zeroed channel is this batch's zero image; all are identical
            feats.zero_skips = [s[:1] for s in feats.skips[missing[0]]]
        return feats

    def fuse(self, feats, subset):
        """Decoder inputs for one subset: (deep (N, M*C, ...), [s0..s3] each (N, M*C_i, ...)).

        Missing deep features are the mean of the available ones; missing skips are the
        all-zero image's, broadcast over the batch.
        """
        fill = torch.stack([feats.deep[m] for m in subset]).mean(dim=0)
        n = fill.shape[0]
        modalities = range(self.config.in_modalities)
        deep = torch.cat([feats.deep[m] if m in subset else fill for m in modalities], dim=1)

        def skip(m, i):
            if m in subset:
                return feats.skips[m][i]
            return feats.zero_skips[i].expand(n, *feats.zero_skips[i].shape[1:])

        num_scales = len(feats.skips[subset[0]])
        skips = [torch.cat([skip(m, i) for m in modalities], dim=1) for i in range(num_scales)]
        return deep, skips

    def distill(self, feats, subset, teachers):
        """Cross-modal distillation term (fp32 scalar); 0 when no teacher is available."""
        kd = feats.deep[subset[0]].new_zeros((), dtype=torch.float32)
        for t in teachers:
            if t not in subset:
                continue
            target = feats.deep[t].detach().float()
            for s in subset:
                if s != t:
                    kd = kd + F.l1_loss(feats.deep[s].float(), target)
        return kd

    def forward(self, x, subset=None, teachers=()):
        """x (N, M, D, H, W) -> logits (N, num_classes, D, H, W), kd (scalar fp32 tensor).

        subset: available modality indices (default all); teachers: modality indices whose
        deep features are distilled into every other available modality.
        """
        self._check_input(x)
        m = self.config.in_modalities
        subset = self._as_subset(range(m) if subset is None else subset)
        teachers = self._as_subset(teachers, allow_empty=True)
        feats = self.encode_subset(x, subset, all_channels=self._batch_statistics() or self.config.encode_all)
        logits = self.decoder(*self.fuse(feats, subset))
        return logits, self.distill(feats, subset, teachers)

    def forward_subsets(self, x, subsets):
        """Logits for several subsets of the same input: (N, S, num_classes, D, H, W).

        Each modality (and the zero image) is encoded once and each subset decoded, instead
        of one encoder pass per subset; equal to [model(x, s)[0] for s in subsets].
        """
        self._check_input(x)
        subsets = [self._as_subset(s) for s in subsets]
        if self._batch_statistics() or self.config.encode_all:  # no shared encoder passes
            return torch.stack([self(x, s)[0] for s in subsets], dim=1)
        used = sorted(set().union(*subsets))
        missing_any = any(len(s) < self.config.in_modalities for s in subsets)
        feats = self.encode(x, used, zero_image=missing_any)
        return torch.stack([self.decoder(*self.fuse(feats, s)) for s in subsets], dim=1)
