"""Segmenting cases with a trained checkpoint: what eval.py and predict.py share.

* the network, rebuilt from the configuration train.py stores in the checkpoint; a model flag
  given must agree with it (`add_model_args`, `load_model`);
* the inference flags, checked when parsed, before any work;
* a normalised case's label maps for one or several modality subsets (`segment`).
"""
from dataclasses import fields, replace

from models import ACTIVATIONS, LCKD, MODEL_SIZES, NORMS, LCKDConfig
from utils.checkpoint import load_checkpoint, network_mismatch
from utils.cli import (PUBLISHED_INPUT_SIZE, UsageError, device_name, overlap_fraction,
                       positive_int, str2bool, window_size)
from utils.distributed import DEVICE_NAMES
from utils.inference import AMP_DTYPES, AVERAGES, predict_subsets
from utils.regions import probabilities_to_labels


def add_model_args(parser):
    g = parser.add_argument_group("model (default: from the checkpoint's config)")
    g.add_argument("--input_size", type=window_size, default=None,
                   help=f"sliding-window size D,H,W (default: the training patch, else {PUBLISHED_INPUT_SIZE})")
    g.add_argument("--num_classes", type=int, default=3)
    g.add_argument("--weight_std", type=str2bool, default=None)
    g.add_argument("--norm_cfg", choices=NORMS, default=None)
    g.add_argument("--activation_cfg", choices=ACTIVATIONS, default=None)
    g.add_argument("--model_size", choices=MODEL_SIZES, default=None)


def add_inference_args(parser):
    g = parser.add_argument_group("inference")
    g.add_argument("--device", type=device_name, default="auto", help=DEVICE_NAMES)
    g.add_argument("--overlap", type=overlap_fraction, default=1 / 3)
    g.add_argument("--average", choices=AVERAGES, default="probabilities",
                   help="what overlapping windows average: their sigmoid probabilities "
                        "(published) or their logits (as the published teacher election)")
    g.add_argument("--gaussian", action="store_true", help="Gaussian window weighting (nnU-Net)")
    g.add_argument("--mirror", action="store_true", help="average over the 8 axis flips (8x slower)")
    g.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off")
    g.add_argument("--batch_size", type=positive_int, default=2, help="windows per forward pass")
    return g


# ------------------------------------------------------------------------------------- model
# The model flags train.py records -> their LCKDConfig field.
MODEL_FLAGS = {"weight_std": "weight_std", "norm_cfg": "norm", "activation_cfg": "activation"}


def refuse_contradicting_flags(args, saved, path):
    """UsageError for a model flag given (not None) that differs from the checkpoint's record
    (`model_config`, else train.py's flag): weight standardisation and the activation hold no
    weights, so another value would load cleanly and silently change the masks (another norm
    is caught by the weights too, but said as plainly). A bare state_dict records nothing: the
    flags build the network."""
    network = saved.get("model_config", {})
    for flag, field in MODEL_FLAGS.items():
        given, recorded = getattr(args, flag), network.get(field, saved.get(flag))
        if given is not None and recorded is not None and given != recorded:
            raise UsageError(f"--{flag} {given}: checkpoint {path} holds a network trained with "
                             f"--{flag} {recorded}; drop the flag, or pass --{flag} {recorded}")


def resolve_model_config(args, saved, path):
    """Checkpoint config + explicit flags -> (LCKDConfig, window (d, h, w)).

    The network is the one train.py recorded (`model_config`); a model flag given must agree
    with the record (refuse_contradicting_flags). `--model_size`, a bare state_dict or a config
    without it start from the named size and the config's flags, the flags given replacing them
    (a bare state_dict records none). The speed-only fields (activation checkpointing, the
    published encoder work) are off.
    """
    refuse_contradicting_flags(args, saved, path)
    pick = lambda flag, key, default: flag if flag is not None else saved.get(key, default)
    if args.model_size is None and "model_config" in saved:
        unknown = sorted(set(saved["model_config"]) - {f.name for f in fields(LCKDConfig)})
        if unknown:
            raise UsageError(f"checkpoint {path} records network settings this version does not "
                             f"know ({', '.join(unknown)}): evaluate it with the version that trained it")
        base = LCKDConfig(**saved["model_config"])
    else:
        published = LCKDConfig()
        base = LCKDConfig.from_name(pick(args.model_size, "model_size", "full"),
                                    **{field: saved.get(flag, getattr(published, field))
                                       for flag, field in MODEL_FLAGS.items()})
    explicit = {field: getattr(args, flag) for flag, field in MODEL_FLAGS.items()
                if getattr(args, flag) is not None}
    config = replace(base, **explicit, checkpoint_encoder=False, encode_all=False)
    if args.num_classes != config.num_classes:
        raise UsageError(f"--num_classes {args.num_classes}: the network predicts "
                         f"{config.num_classes} regions (ET, WT, TC)")
    size = pick(args.input_size, "input_size", PUBLISHED_INPUT_SIZE)
    # The flag's parsed tuple or a saved list, as text: window_size checks 'D,H,W' text, and
    # its messages quote a saved value in the form a user would type it.
    window = window_size(size if isinstance(size, str) else ",".join(map(str, size)))
    return config, window


def load_model(path, args, device):
    """Checkpoint written by train.py (or a bare state_dict) -> (model in eval mode, config, window)."""
    try:
        checkpoint = load_checkpoint(path)
    except (FileNotFoundError, RuntimeError) as error:  # load_checkpoint's messages name the file
        raise UsageError(str(error)) from error
    # A bare state_dict (no "model" key) carries no config: the flags / published defaults apply.
    state, saved = ((checkpoint["model"], checkpoint.get("config", {})) if "model" in checkpoint
                    else (checkpoint, {}))
    config, window = resolve_model_config(args, saved, path)
    model = LCKD(config)
    given = " ".join(f"--{k} {getattr(args, k)}" for k in ("model_size", "norm_cfg")
                     if getattr(args, k) is not None)
    problem = network_mismatch(model, state, given)
    if problem:
        raise UsageError(f"checkpoint {path} does not fit the network built {problem}")
    model.load_state_dict(state)
    return model.to(device).eval(), config, window


# ---------------------------------------------------------------------------------- predicting
def segment(model, image, subsets, window, args, device):
    """Normalised image (4, D, H, W) -> one uint8 label map (D, H, W) per subset.

    args: the flags of add_inference_args (average, overlap, gaussian, mirror, amp, batch_size).
    """
    probs = predict_subsets(model, image, subsets, window, args.average, overlap=args.overlap,
                            gaussian=args.gaussian, batch_size=args.batch_size,
                            mirror=args.mirror, device=device, amp=args.amp)
    return [probabilities_to_labels(p) for p in probs]
