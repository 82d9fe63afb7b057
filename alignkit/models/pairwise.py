"""A pairwise preference model P(a better than b | x) that reports its uncertainty.

Xu et al. 2025, arXiv 2510.20369 (algorithms.md section 2.2). The prompt and both answers are
one sequence, rendered as a user message

    {prompt}
    [assistant_1]
    {a}
    [assistant_2]
    {b}

through `alignkit.data.tokenize.Encoder` (the chat template when the tokenizer has one) and closed
by an empty assistant turn, so the sequence ends with the end-of-turn or EOS token. A causal-LM
backbone (its base model, without the LM head) reads it; the hidden state h at the last non-pad
token goes to a head, chosen by name from PREFERENCE_HEADS:

- "sngp": spectral-normalised linear layer, random Fourier features, Laplace-approximated GP
  output layer (SNGP, Liu et al. 2020, arXiv 2006.10108), as in the paper:
  phi(h) = sqrt(2/D) cos(W SN(h) + b), W ~ N(0, rff_std^2) and b ~ U(0, 2 pi) frozen, g = beta^T phi.
  After training one frozen pass accumulates the posterior precision P = ridge I + sum_i phi_i phi_i^T;
  then v = ridge phi^T P^-1 phi, u = sqrt(1 + gp_amplitude v) and the calibrated logit is g / u.
- "dropout": MC dropout, a linear head after dropout(p); at inference T passes with T seeded
  dropout masks (shared by the rows of a batch, so a comparison gets the same answer in any
  batch), g_hat = mean and u = standard deviation of the T logits (Gal & Ghahramani 2016).
- "linear": a plain logit, no uncertainty (the baseline).

Reconstructed details (not fixed by the paper or the reference code), stated here as such:
- The reference code builds a spectral-normalised pooling layer but computes the random
  features from h directly. Here one hidden -> hidden linear layer sits before the features,
  its weight rescaled to W * min(1, sn_range / sigma(W)), sigma being torch's power-iteration
  estimate (torch.nn.utils.parametrizations.spectral_norm, one iteration per training forward)
  - the bound of SNGP's edward2 layer. It starts as the identity, so that at initialisation the
  features are those of the reference code, phi(h).
- The head computes in float32 (precision and solve in float64) whatever the backbone's dtype.
- D defaults to 1024 (the paper uses 4096); beta starts N(0, 0.05^2) as in the reference code.
- The precision is accumulated over both orders of every training comparison, as trained.
- MC dropout here is in the head only (one backbone pass, T cheap head passes); the reference
  code also drops out inside every decoder layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from alignkit.data.tokenize import Completion, Encoded, Encoder, Prompt, TokenizeConfig, collate, message_text
from alignkit.registry import Registry

PREFERENCE_HEADS = Registry("preference head")
CONFIG_FILE, HEAD_FILE = "preference_model.json", "preference_head.safetensors"
TAIL_ROOM = 16  # tokens kept free after the comparison for the template's closing tokens


@dataclass
class PairwiseConfig:
    """The preference model's head; `model.pairwise.*` on the command line."""

    head: str = "sngp"            # sngp | dropout | linear
    features: int = 1024          # D, random Fourier features (sngp; the paper uses 4096)
    rff_std: float = 0.05         # standard deviation of the frozen feature weights W
    sn_range: float = 10.0        # bound on the spectral norm of the layer before the features
    ridge: float = 1e-3           # prior precision of beta
    gp_amplitude: float = 0.1     # lambda in u = sqrt(1 + lambda v)
    dropout: float = 0.1          # p (dropout head)
    passes: int = 8               # T stochastic passes at inference (dropout head)
    seed: int = 0                 # head initialisation, and the dropout masks at inference


# ----- turning a comparison into one sequence -----
def pair_text(prompt: Prompt, a: Completion, b: Completion) -> str:
    """The user message holding the prompt and both answers. Chat messages are written as "role: content"
    lines (tool calls as JSON); a prompt that is one user message is its text, as in the text format."""
    return f"{_as_text(prompt)}\n[assistant_1]\n{_as_text(a)}\n[assistant_2]\n{_as_text(b)}"


def _as_text(value: Prompt | Completion) -> str:
    if isinstance(value, str):
        return value
    if len(value) == 1 and value[0]["role"] == "user" and set(value[0]) == {"role", "content"}:
        return value[0]["content"]
    return "\n".join(f"{m['role']}: {message_text(m)}" for m in value)


class PairEncoder:
    """Encodes (prompt, a, b) as one sequence. The whole window but TAIL_ROOM tokens holds the
    comparison; a longer one loses its beginning (the Encoder keeps the end) and is counted."""

    def __init__(self, tokenizer, cfg: TokenizeConfig | None = None):
        cfg = cfg or TokenizeConfig()
        room = max(cfg.max_length - TAIL_ROOM, cfg.max_length // 2)
        self.encoder = Encoder(tokenizer, replace(cfg, max_prompt_length=room))

    @property
    def truncated(self) -> int:
        return self.encoder.truncated

    def encode(self, prompt: Prompt, a: Completion, b: Completion) -> Encoded:
        return self.encoder.encode(pair_text(prompt, a, b), "")


def last_token_states(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """hidden [B, T, H] at each row's last non-pad position (either padding side): [B, H]."""
    last = attention_mask.shape[1] - 1 - attention_mask.long().flip(1).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


# ----- heads -----
class PreferenceHead(nn.Module):
    """Pooled hidden state [B, H] (float32) -> logit [B]; `predict` -> (calibrated logit, uncertainty)."""

    uses_posterior = False

    def predict(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        return self(h), None

    def reset_posterior(self) -> None:
        pass

    def accumulate(self, h: Tensor) -> None:
        pass


def _linear(size: int) -> nn.Linear:
    out = nn.Linear(size, 1)
    nn.init.normal_(out.weight, std=1 / (size + 1))
    nn.init.zeros_(out.bias)
    return out


@PREFERENCE_HEADS.register("linear", summary="plain logit, no uncertainty (baseline)")
class LinearHead(PreferenceHead):
    def __init__(self, hidden_size: int, cfg: PairwiseConfig):
        super().__init__()
        self.out = _linear(hidden_size)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(h).squeeze(-1)


@PREFERENCE_HEADS.register("dropout", summary="MC dropout: mean and std of T seeded dropout passes",
                           paper="Gal & Ghahramani 2016, arXiv 1506.02142")
class DropoutHead(PreferenceHead):
    def __init__(self, hidden_size: int, cfg: PairwiseConfig):
        super().__init__()
        if not 0 < cfg.dropout < 1 or cfg.passes < 2:
            raise ValueError("the dropout head needs 0 < model.pairwise.dropout < 1 and model.pairwise.passes >= 2")
        self.p, self.passes, self.seed = cfg.dropout, cfg.passes, cfg.seed
        self.out = _linear(hidden_size)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(F.dropout(h, self.p, self.training)).squeeze(-1)

    def predict(self, h: Tensor) -> tuple[Tensor, Tensor]:
        generator = torch.Generator(device=h.device).manual_seed(self.seed)
        keep = torch.rand(self.passes, h.shape[-1], generator=generator, device=h.device) >= self.p
        logits = self.out(h[None] * keep[:, None] / (1 - self.p)).squeeze(-1)  # [T, B]
        return logits.mean(0), logits.std(0, unbiased=False)


class SpectralLinear(nn.Module):
    """Linear layer with weight W * min(1, bound / sigma(W)): spectral norm at most `bound`.

    torch's spectral_norm parametrization gives W / sigma (sigma by power iteration); multiplying
    by min(sigma, bound) keeps W when it is within the bound. Starts as the identity.
    """

    def __init__(self, size: int, bound: float):
        super().__init__()
        linear = nn.Linear(size, size)
        with torch.no_grad():
            linear.weight.copy_(torch.eye(size))
            linear.bias.zero_()
        self.linear, self.bound = spectral_norm(linear), bound

    def weight(self) -> Tensor:
        unit = self.linear.weight  # W / sigma
        sigma = self.linear.parametrizations.weight.original.norm() / unit.norm()
        return unit * sigma.clamp(max=self.bound)

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight(), self.linear.bias)


@PREFERENCE_HEADS.register("sngp", summary="spectral norm + random Fourier features + Laplace GP layer",
                           paper="Xu et al. 2025, arXiv 2510.20369; SNGP: Liu et al. 2020, arXiv 2006.10108")
class SNGPHead(PreferenceHead):
    uses_posterior = True

    def __init__(self, hidden_size: int, cfg: PairwiseConfig):
        super().__init__()
        size = cfg.features
        self.ridge, self.amplitude = cfg.ridge, cfg.gp_amplitude
        self.sn = SpectralLinear(hidden_size, cfg.sn_range)
        self.register_buffer("rff_weight", torch.randn(size, hidden_size) * cfg.rff_std)
        self.register_buffer("rff_bias", torch.rand(size) * 2 * math.pi)
        self.beta = nn.Parameter(torch.randn(size) * 0.05)
        self.register_buffer("precision", cfg.ridge * torch.eye(size, dtype=torch.float64))
        self._factor: tuple[tuple, Tensor] | None = None

    def features(self, h: Tensor) -> Tensor:
        """phi(h) = sqrt(2/D) cos(W SN(h) + b): random Fourier features of an RBF kernel (Rahimi & Recht 2007)."""
        return math.sqrt(2 / len(self.beta)) * torch.cos(F.linear(self.sn(h), self.rff_weight, self.rff_bias))

    def forward(self, h: Tensor) -> Tensor:
        return self.features(h) @ self.beta

    def reset_posterior(self) -> None:
        self.precision.copy_(self.ridge * torch.eye(len(self.beta), dtype=torch.float64))

    def accumulate(self, h: Tensor) -> None:
        self.accumulate_features(self.features(h))

    def accumulate_features(self, phi: Tensor) -> None:
        """P += Phi^T Phi for a batch of features [B, D]."""
        phi = phi.detach().double()
        self.precision += phi.T @ phi

    def variance(self, phi: Tensor) -> Tensor:
        """v = ridge phi^T P^-1 phi per row (Laplace approximation of the GP posterior)."""
        phi = phi.detach().double()
        solved = torch.cholesky_solve(phi.T, self._cholesky()).T
        return self.ridge * (phi * solved).sum(-1)

    def predict(self, h: Tensor) -> tuple[Tensor, Tensor]:
        phi = self.features(h)
        u = torch.sqrt(1 + self.amplitude * self.variance(phi)).float()
        return (phi @ self.beta) / u, u  # mean-field calibrated logit g / u

    def _cholesky(self) -> Tensor:
        key = (self.precision.data_ptr(), self.precision._version)
        if self._factor is None or self._factor[0] != key:
            self._factor = (key, torch.linalg.cholesky(self.precision))
        return self._factor[1]


# ----- the model -----
class PreferenceModel(nn.Module):
    """A causal LM's backbone plus a preference head: (prompt, a, b) as one sequence -> logit.

    `forward` gives the trained logit g; `predict` the calibrated logit and the uncertainty
    (None for the linear head). Saves as a plain transformers base-model directory (the
    backbone) plus the head's weights and config; `from_pretrained` reloads it.
    """

    def __init__(self, backbone: nn.Module, cfg: PairwiseConfig | None = None):
        super().__init__()
        self.backbone, self.pairwise = backbone, cfg or PairwiseConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.pairwise.seed)
            self.head = PREFERENCE_HEADS.get(self.pairwise.head).fn(backbone.config.hidden_size, self.pairwise)
        self.head.to(next(backbone.parameters()).device)

    @classmethod
    def from_causal_lm(cls, model: nn.Module, cfg: PairwiseConfig | None = None) -> PreferenceModel:
        """Use the base model of a loaded causal LM (e.g. `model.model` of a Llama); its LM head is dropped."""
        return cls(getattr(model, model.base_model_prefix), cfg)

    @property
    def config(self):
        return self.backbone.config

    def pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return last_token_states(hidden, attention_mask).float()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.pooled(input_ids, attention_mask)
        with torch.autocast(h.device.type, enabled=False):
            return self.head(h)

    def predict(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor | None]:
        h = self.pooled(input_ids, attention_mask)
        with torch.autocast(h.device.type, enabled=False):
            return self.head.predict(h)

    def accumulate_posterior(self, input_ids: Tensor, attention_mask: Tensor) -> None:
        h = self.pooled(input_ids, attention_mask)
        with torch.autocast(h.device.type, enabled=False):
            self.head.accumulate(h)

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True, state_dict: dict | None = None,
                        **kwargs) -> None:
        """The backbone as a plain transformers folder, the head beside it; `state_dict` (the whole model's,
        e.g. gathered from FSDP2 shards) replaces the live weights."""
        path = Path(path)
        state_dict = state_dict if state_dict is not None else self.state_dict()
        parts = {name: {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(f"{name}.")}
                 for name in ("backbone", "head")}
        self.backbone.save_pretrained(path, safe_serialization=safe_serialization, state_dict=parts["backbone"],
                                      **kwargs)
        save_file({k: v.detach().contiguous().cpu() for k, v in parts["head"].items()}, path / HEAD_FILE)
        (path / CONFIG_FILE).write_text(json.dumps(asdict(self.pairwise), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> PreferenceModel:
        """Reload a saved model; `kwargs` (dtype, revision...) go to AutoModel.from_pretrained."""
        from transformers import AutoModel

        path = Path(path)
        cfg = PairwiseConfig(**json.loads((path / CONFIG_FILE).read_text()))
        model = cls(AutoModel.from_pretrained(path, **kwargs), cfg)
        model.head.load_state_dict(load_file(path / HEAD_FILE, device=str(next(model.head.parameters()).device)))
        return model


def is_preference_model(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_preference_model(path: str | Path, **kwargs):
    """(model, tokenizer) saved by `alignkit pairwise-rm` (run/checkpoints/step-N/model)."""
    from transformers import AutoTokenizer

    model = PreferenceModel.from_pretrained(path, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ----- batches -----
def _batch(model: nn.Module, encoded: Sequence[Encoded], pad_id: int):
    return collate(list(encoded), pad_id).to(next(model.parameters()).device)


def pair_logits(model: PreferenceModel, encoded: Sequence[Encoded], pad_id: int) -> Tensor:
    """Trained logits g [n] of encoded comparisons."""
    batch = _batch(model, encoded, pad_id)
    return model(batch.input_ids, batch.attention_mask)


def pair_predictions(model: PreferenceModel, encoded: Sequence[Encoded], pad_id: int
                     ) -> tuple[Tensor, Tensor | None]:
    """Calibrated logits [n] and uncertainties [n] (or None) of encoded comparisons."""
    batch = _batch(model, encoded, pad_id)
    return model.predict(batch.input_ids, batch.attention_mask)
