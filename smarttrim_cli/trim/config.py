"""Where trimmers go and how they decide: a plain, serialisable config (stored in config.json)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import SmartTrimError

FUSE_MODES = ("single", "nearest")


@dataclass
class TrimConfig:
    """Layer indices per stream. The streams are the backbone family's (``streams`` of its model,
    backbones/base.py StreamSpec; e.g. METER's ``text``/``vision`` uni-modal encoders and ``xtext``/
    ``ximage`` cross-modal streams). A token trimmer at layer i decides which tokens enter layer i; a
    head trimmer at layer i gates that layer's attention heads (one per attention of the layer)."""

    token_layers: dict = field(default_factory=dict)
    head_layers: dict = field(default_factory=dict)
    threshold: float = 0.5
    reduction: int = 8
    init_keep: float = 3.0
    # merge each trimmer's dropped tokens into one token (size-weighted mean) that later attention weighs by
    # log(size) (ToMe's proportional attention): softmax denominators, and with them what attention can
    # count, stay close to the untrimmed model's (trim/fusion.py)
    fuse: bool = False
    # with fuse: "single" merges every dropped token into one; "nearest" merges each into the kept token (or that
    # one catch-all token) whose state is closest, so object fragments join their object (trim/fusion.py)
    fuse_mode: str = "single"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrimConfig":
        known = {k: d[k] for k in ("token_layers", "head_layers", "threshold", "reduction", "init_keep", "fuse",
                                      "fuse_mode") if k in d}
        cfg = cls(**known)
        cfg.token_layers = {k: [int(i) for i in v] for k, v in cfg.token_layers.items()}
        cfg.head_layers = {k: [int(i) for i in v] for k, v in cfg.head_layers.items()}
        return cfg

    def validate(self, n_layers: dict, source: str = "trim config"):
        for kind, table in (("token", self.token_layers), ("head", self.head_layers)):
            for stream, layers in table.items():
                if stream not in n_layers:
                    raise SmartTrimError(f"{source}: unknown stream {stream!r} for {kind} trimmers "
                                         f"(this backbone has {', '.join(n_layers)})")
                bad = [i for i in layers if not 0 <= i < n_layers[stream]]
                if bad:
                    raise SmartTrimError(f"{source}: {kind} trimmer layer(s) {bad} out of range for stream "
                                         f"{stream!r} (0..{n_layers[stream] - 1})")
        if self.fuse_mode not in FUSE_MODES:
            raise SmartTrimError(f"{source}: fuse_mode must be one of {', '.join(FUSE_MODES)}, got {self.fuse_mode!r}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise SmartTrimError(f"{source}: threshold must be in (0, 1), got {self.threshold}")


def parse_layer_spec(spec: str, source: str = "--token-layers") -> dict:
    """``"vision=2,4,6 ximage=0,2"`` (or ``;``-separated) -> {"vision": [2,4,6], "ximage": [0,2]}.
    ``stream=`` (empty) turns a stream off."""
    out = {}
    for part in spec.replace(";", " ").split():
        if "=" not in part:
            raise SmartTrimError(f"{source}: expected STREAM=L1,L2,... got {part!r}")
        stream, layers = part.split("=", 1)
        try:
            out[stream.strip()] = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise SmartTrimError(f"{source}: layer indices must be integers in {part!r}") from None
    return out
