"""Ranked remedies for each finding kind, depending on the model's context.

Each ``rx_*`` function scores candidate remedies (higher = try earlier) and gives a reason that
refers to the evidence. Scores are priors from the literature, adjusted by context (activation
kinds, batch norm present, depth, the optimiser already used, gradient magnitudes); the doctor's
trials then test them on the actual model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from signalprop.diagnosis.context import Context, fmt
from signalprop.diagnosis.findings import Prescription
from signalprop.diagnosis.thresholds import Thresholds

Candidate = tuple[str, float, str]  # (remedy, score, reason)


#: Remedies that rewrite an ``nn.Sequential`` of (layer, activation) blocks.
_BLOCK_REMEDIES = ("batchnorm", "layernorm", "residual", "highway", "fewer_layers")


def not_applicable(ctx: Context, remedy: str) -> str | None:
    """Why ``remedy`` does not fit the model of ``ctx`` (already there, or cannot be applied),
    or ``None`` when it may be prescribed. Unknown facts (``None``) never exclude a remedy."""
    if remedy in ("residual", "highway") and ctx.residual is True:
        return "the model already has skip connections"
    if remedy == "batchnorm" and ctx.has_bn:
        return "the model already has batch norm"
    if remedy == "batchnorm" and (ctx.transformer or ctx.recurrent):
        return "batch norm does not fit attention or recurrent layers (they use layer norm)"
    if remedy == "layernorm" and ctx.has_other_norm:
        return "the model already has layer/group norm"
    if remedy in _BLOCK_REMEDIES and ctx.sequential_blocks is False:
        return "the model has no nn.Sequential of (layer, activation) blocks to rewrite"
    if remedy == "fewer_layers" and (ctx.transformer or ctx.recurrent):
        return "its weight-layer count is not a stack of identical blocks to shorten"
    if remedy == "critical_init" and (ctx.transformer or ctx.recurrent):
        return "the critical init is derived for a stack of (layer, activation) blocks"
    if remedy == "pre_ln" and not ctx.pre_ln_switchable:
        return "no post-LN torch.nn.Transformer layer to switch"
    if remedy in ("relu", "scaled_activation") and ctx.activation_modules is False:
        return "the activations are functions called in forward(), not modules to swap"
    if remedy == "lsuv_init" and ctx.example_input is False:
        return "LSUV rescales layers on example inputs, and none can be taken from the batches"
    return None


def rank(cands: Iterable[Candidate], ctx: Context | None = None) -> list[Prescription]:
    """Deduplicate (best score wins), drop what does not fit the model (:func:`not_applicable`),
    sort by score, number from 1."""
    best: dict[str, tuple[float, str]] = {}
    for remedy, score, reason in cands:
        if ctx is not None and not_applicable(ctx, remedy) is not None:
            continue
        if remedy not in best or score > best[remedy][0]:
            best[remedy] = (score, reason)
    order = sorted(best.items(), key=lambda kv: -kv[1][0])
    return [Prescription(i + 1, r, reason) for i, (r, (_, reason)) in enumerate(order)]


def _transformer_cands(ctx: Context, base: float) -> list[Candidate]:
    """What transformers need (Xiong et al. 2020; Liu et al. 2020): a post-LN stack has
    gradients that grow toward the output at init, so it trains only with warm-up and a small
    rate, or after moving the norms in front of each sub-block (pre-LN)."""
    if not ctx.transformer:
        return []
    c: list[Candidate] = []
    if ctx.norm_placement == "post":
        c.append(("pre_ln", base + 1.5, "post-LN transformer layers (norm after the residual sum) "
                  "put large, depth-dependent gradients on the output side at init; pre-LN "
                  "keeps them well behaved without warm-up (Xiong et al. 2020)"))
        c.append(("warmup", base + 1.0, "post-LN transformers need a learning-rate warm-up: "
                  "the early steps are where their gradients are most unbalanced "
                  "(Xiong et al. 2020)"))
        c.append(("lower_lr", base + 0.5, "a smaller rate keeps the early post-LN updates stable "
                  "(Liu et al. 2020)"))
    else:
        c.append(("warmup", base, "a learning-rate warm-up keeps the first transformer updates "
                  "small while Adam's statistics settle (Liu et al. 2020)"))
        c.append(("lower_lr", base - 0.5, "a smaller rate for the attention layers' updates"))
    if not ctx.adaptive_optimizer:
        c.append(("adam", base, "transformers are trained with Adam: per-parameter step sizes "
                  "for embeddings, attention and feed-forward weights of very different scales"))
    c.append(("clip_norm", base - 1.0, "clipping the global norm (usually at 1) bounds the "
              "occasional gradient spike of attention layers"))
    return c


def _optimizer_cands(
    ctx: Context, n: Mapping[str, float], th: Thresholds, base: float
) -> list[Candidate]:
    """Scale-free optimisers: Adam/RMSprop divide by sqrt(v) + eps, so they rescue a small
    gradient only while it is well above eps; sign-based Rprop ignores the magnitude entirely."""
    rms = n.get("min_grad_rms", float("nan"))
    out: list[Candidate] = []
    if ctx.adaptive_optimizer and ctx.optimizer != "sgd":
        base -= 2  # already tried something of this family
    zero = int(n.get("zero_gradient_layers", 0) or 0)
    if zero:
        # sign(0) = 0 and 0 / (sqrt(0) + eps) = 0: no optimiser moves a weight whose gradient
        # is exactly zero
        why = (f"only for the layers with non-zero gradients: {zero} layer(s) get exactly 0, "
               "and no optimiser can move a weight whose gradient is 0")
        return [("rprop", base - 2, "sign-based steps ignore gradient size, but " + why),
                ("adam", base - 3, "normalised steps, but " + why),
                ("smorms3", base - 3.5, "eps 1e-16 rescues tiny gradients, but " + why)]
    if rms == rms and rms < th.adaptive_eps_floor:
        small = "exactly 0 (underflow)" if rms == 0 else fmt(rms)
        out.append((
            "rprop", base + 0.5,
            f"the smallest per-element gradient is {small}, in the regime where Adam's eps "
            "(1e-8) dominates; Rprop's sign-based steps do not depend on the gradient's size",
        ))
        out.append((
            "adam", base - 3,
            f"only partly: with per-element gradients down to {small} Adam's eps (1e-8) "
            "dominates sqrt(v) in the early layers and their steps shrink with the gradient",
        ))
        out.append(("smorms3", base - 1.5,
                    "adaptive like RMSprop but with eps 1e-16, so much smaller gradients still "
                    "give full-size steps"))
    else:
        out.append((
            "adam", base,
            "divides each step by a running gradient RMS, so layers with 100x smaller "
            "gradients still take steps of similar size",
        ))
        out.append(("rmsprop", base - 1, "per-parameter normalisation of the step by the "
                    "gradient RMS (Adam without momentum correction)"))
        out.append(("rprop", base - 1.5, "sign-based steps whose size adapts per weight, "
                    "independent of the gradient's magnitude (full-batch friendly)"))
    out.append(("vsgd", base - 2.5, "variational SGD: a per-parameter noise-adaptive step size"))
    return out


#: Vanishing gradients in sigmoid nets: inits and activations beside switching to ReLU.
_SIGMOID_CANDS: tuple[Candidate, ...] = (
    ("critical_init", 6.5, "choose sigma_w so that chi_1 = sigma_w^2 E[phi'(z)^2] = 1 "
     "(Schoenholz et al. 2017): the gradient is then preserved across depth"),
    ("xavier_init", 5.5, "Glorot & Bengio 2010 scale the weights to keep gradient variance "
     "constant across sigmoid/tanh layers"),
    ("scaled_activation", 5.0, "a centred, rescaled activation (e.g. 4*sigmoid-2 or tanh) "
     "removes the sigmoid's 1/4 derivative cap and its non-zero mean"),
)

#: Vanishing gradients in tanh-like nets.
_TANH_CANDS: tuple[Candidate, ...] = (
    ("critical_init", 8.0, "tanh-like nets at the edge of chaos (chi_1 = 1, Schoenholz et al. "
     "2017) keep gradients O(1) over depth"),
    ("orthogonal_init", 7.5, "orthogonal weights at criticality give dynamical isometry for "
     "tanh nets (Pennington et al. 2017): all singular values near 1"),
    ("relu", 5.0, "ReLU's derivative is exactly 1 on active units"),
    ("xavier_init", 6.0, "Glorot & Bengio 2010 scale the weights to keep gradient variance "
     "constant across tanh layers"),
)


def rx_vanishing(ctx: Context, n: Mapping[str, float], th: Thresholds) -> list[Prescription]:
    """Vanishing gradients: restore an O(1) per-layer gradient factor."""
    factor = n.get("per_layer_factor", float("nan"))
    fac = f"each layer multiplies the gradient by ~{fmt(factor)}" if factor == factor else ""
    sat = ctx.saturating
    deep = ctx.depth >= 10
    c = _vanishing_structure(ctx, fac, deep) + _vanishing_activation(ctx)
    if ctx.rectifiers:
        c += _rectifier_init(ctx)
    c.append(("lsuv_init", 6.0, "LSUV (Mishkin & Matas 2016) rescales each layer on real data "
              "until its output variance is 1, whatever the activation"))
    if "orthogonal_init" not in [x[0] for x in c]:
        c.append(("orthogonal_init", 5.0, "orthogonal weights preserve norms in each layer's "
                  "linear part (Saxe et al. 2013)"))
    c += _optimizer_cands(ctx, n, th, 6.0)
    c += _transformer_cands(ctx, 8.0)
    c.append(("layerwise_lr", 4.5, "a larger learning rate for the early layers compensates "
              "their smaller gradients (up to a point: it cannot revive an exactly zero one)"))
    if deep:
        c.append(("fewer_layers", 5.5 if not sat else 6.0,
                  f"{ctx.depth} layers multiply the per-layer factor {ctx.depth - 1} times; "
                  "a shallower net loses less"))
    return rank(c, ctx)


def _vanishing_structure(ctx: Context, fac: str, deep: bool) -> list[Candidate]:
    """Normalisation and skips, where the model lacks them."""
    c: list[Candidate] = []
    sat = ctx.saturating
    if not ctx.has_bn:
        why = "normalising each pre-activation to zero mean, unit variance keeps "
        if "sigmoid" in sat:
            why += "the sigmoid's derivative near its maximum and "
        why += "the per-layer gradient factor near 1" + (f" (now {fac})" if fac else "")
        c.append(("batchnorm", 9.0 if sat else 7.5, why))
    if ctx.residual is not True:
        c.append((
            "residual", 8.5 if deep else 6.5,
            f"identity skips give each of the {ctx.depth} layers a direct gradient path, so the "
            "backward signal no longer multiplies through every layer",
        ))
        c.append(("highway", 5.0, "gated skips (Srivastava et al. 2015) carry the gradient past "
                  "layers whose own derivative is small"))
    return c


def _vanishing_activation(ctx: Context) -> list[Candidate]:
    """For saturating activations: ReLU (with the weight scale it needs) and inits."""
    sat, s2 = ctx.saturating, ctx.sigma_w2
    if "sigmoid" in sat:
        if s2 == s2 and s2 < 1.5:
            # ReLU nets keep the gradient only at sigma_w^2 = 2 (He); per layer the backward
            # factor is sqrt(sigma_w^2 / 2) (Poole et al. 2016 / He et al. 2015)
            relu: Candidate = (
                "relu", 4.5,
                f"alone it is not enough here: at the current weight scale sigma_w^2 = {fmt(s2)} "
                f"ReLU would still shrink the gradient ~{fmt(math.sqrt(s2 / 2))}x per layer; "
                "it needs He init (kaiming_init) as well",
            )
        else:
            relu = ("relu", 8.0, "sigmoid'(z) <= 1/4 shrinks the gradient at least 4x per "
                    "layer; ReLU's derivative is 1 on active units")
        return [relu, *_SIGMOID_CANDS]
    return list(_TANH_CANDS) if sat else []


def _rectifier_init(ctx: Context) -> list[Candidate]:
    """He init (scored by how far the weight scale is from sigma_w^2 = 2) and orthogonal."""
    s2 = ctx.sigma_w2
    off = s2 == s2 and not 1.5 <= s2 <= 2.7
    if ctx.has_bn:
        score = 5.0  # BN rescales anyway; the init scale matters little
    else:
        score = 9.5 if off else 6.0
    why = "He init (Var W = 2/fan_in, sigma_w^2 = 2) makes the per-layer gradient factor 1 " \
          "for ReLU"
    if off:
        why += f"; the weights are at sigma_w^2 = {fmt(s2)}"
    elif s2 == s2:
        why += f" (the weights are already near it: sigma_w^2 = {fmt(s2)})"
    return [("kaiming_init", score, why),
            ("orthogonal_init", 6.0, "orthogonal weights preserve norms exactly in the linear "
             "part of each layer")]


def rx_exploding(ctx: Context, n: Mapping[str, float], th: Thresholds) -> list[Prescription]:
    """Exploding gradients: bound the step, then fix the scale at its source."""
    c: list[Candidate] = [
        ("clip_norm", 8.0, "caps the global gradient norm, so one exploding step cannot wreck "
         "the weights"),
        ("agc", 7.0, "adaptive gradient clipping (Brock et al. 2021) bounds each unit's update "
         "relative to its weight norm"),
        ("lower_lr", 6.0, "a smaller step keeps the updates of the large-gradient layers stable"),
        ("clip_value", 4.0, "clipping each gradient element bounds the step element-wise"),
        ("weight_decay", 3.0, "keeps weight norms, and with them the gradient scale, in check"),
    ]
    fwd = n.get("forward_growth", float("nan"))
    init_too_large = fwd == fwd and fwd > 10
    if ctx.has_bn and ctx.residual is not True:
        c.append(("residual", 8.5, "batch norm without skips explodes gradients at init at a "
                  "rate no weight scale removes (Yang et al. 2019, Thm. 9); skips bound it"))
        c.append(("fewer_layers", 6.5, "the BN explosion compounds per layer: fewer layers, "
                  "less growth"))
        c.append(("layernorm", 5.0, "per-example normalisation avoids batch norm's batch-coupled "
                  "gradient explosion"))
    init_score = 8.5 if init_too_large else 5.5
    why = (f"forward activations also grow {fmt(fwd)}x across depth: the init is too large"
           if init_too_large else "a variance-preserving init keeps the per-layer factor near 1")
    if ctx.rectifiers:
        c.append(("kaiming_init", init_score, why + " (He init for ReLU)"))
    if ctx.saturating:
        c.append(("xavier_init", init_score - 0.5, why + " (Glorot init for tanh/sigmoid)"))
        c.append(("critical_init", init_score, why + " (critical sigma_w: chi_1 = 1)"))
    c.append(("lsuv_init", init_score - 1, why + " (LSUV sets each layer's output variance to "
              "1 on data)"))
    c.append(("orthogonal_init", init_score - 1.5, "orthogonal weights have all singular values 1"))
    if not ctx.has_bn and init_too_large:
        c.append(("batchnorm", 6.0, "normalisation stops forward growth compounding over depth"))
    c.append(("adam", 4.5 if not ctx.adaptive_optimizer else 2.0,
              "normalises the step size, so huge gradients do not mean huge steps"))
    c += _transformer_cands(ctx, 7.5)
    return rank(c, ctx)


def rx_saturation(ctx: Context, n: Mapping[str, float], th: Thresholds) -> list[Prescription]:
    """Saturated units: bring pre-activations back into the activation's linear range."""
    grew = n.get("initial_fraction", 0.0) < 0.5 * n.get("mean_fraction", 1.0)
    c: list[Candidate] = []
    if not ctx.has_bn:
        c.append(("batchnorm", 9.0, "normalising pre-activations before the activation keeps "
                  "them near zero, where the derivative is largest (Ioffe & Szegedy 2015)"))
    c.append(("layernorm", 6.5, "per-example normalisation of pre-activations, also usable "
              "with small batches"))
    c.append(("lower_lr", 8.0 if grew else 4.0,
              ("saturation grew during training (from "
               f"{fmt(100 * n.get('initial_fraction', 0.0))}% at the first step): large updates "
               "pushed pre-activations into the tails") if grew else
              "smaller updates drift pre-activations less"))
    if not grew:
        c.append(("xavier_init", 7.5, "units saturated from the start: the init scale is too "
                  "large; Glorot init is designed for saturating units"))
        c.append(("lsuv_init", 7.0, "LSUV sets each layer's output variance to 1 on data"))
        c.append(("critical_init", 6.5, "the critical sigma_w keeps the pre-activation scale "
                  "q* small for tanh-like nets"))
    else:
        c.append(("xavier_init", 5.0, "Glorot init keeps the starting pre-activations moderate"))
        c.append(("weight_decay", 5.5, "shrinks the weights that drive units into saturation"))
        c.append(("clip_norm", 5.0, "bounds the large steps that push units into the tails"))
    c.append(("relu", 6.0, "ReLU does not saturate for positive inputs"))
    c.append(("scaled_activation", 5.5, "a scaled activation with a wider linear range "
              "saturates later"))
    return rank(c, ctx)


def rx_dead(ctx: Context, n: Mapping[str, float], th: Thresholds) -> list[Prescription]:
    """Dead rectifier units: keep units active, stop the steps that kill them."""
    grew = n.get("initial_fraction", 0.0) < 0.5 * n.get("mean_fraction", 1.0)
    c: list[Candidate] = [
        ("lower_lr", 8.5 if grew else 4.0,
         ("units died during training (dead fraction "
          f"{fmt(100 * n.get('initial_fraction', 0.0))}% at the first step): a large update "
          "pushed their biases negative") if grew else "smaller steps kill fewer units"),
        ("clip_norm", 6.5 if grew else 3.5, "bounds the occasional huge step that kills units"),
        ("kaiming_init", 8.0 if not grew else 5.0,
         "units were dead from the start: He init with zero biases keeps about half active"),
        ("lsuv_init", 6.0, "LSUV rescales each layer on data so outputs have unit variance"),
        ("scaled_activation", 6.0, "an activation with a non-zero slope for z < 0 (e.g. SELU, "
         "ELU) cannot die"),
        ("weight_decay", 2.5, "pulls weights, including large negative biases, toward zero"),
    ]
    if not ctx.has_bn:
        c.append(("batchnorm", 7.0, "centring pre-activations per batch keeps about half the "
                  "units active"))
    return rank(c, ctx)


def rx_nonfinite(ctx: Context, n: Mapping[str, float], th: Thresholds) -> list[Prescription]:
    """NaN/Inf: if the data are to blame no remedy applies; otherwise stabilise the steps."""
    if n.get("data_nonfinite", 0) > 0 or n.get("at_input", 0) > 0:
        return []  # the data must be cleaned; no training remedy fixes NaN inputs
    at_init = n.get("first_step", 1) == 0
    c: list[Candidate] = [
        ("lower_lr", 9.0 if not at_init else 4.0, "the run blew up during training: a smaller "
         "step keeps it in the stable region"),
        ("clip_norm", 8.5, "caps the global gradient norm so one large step cannot overflow the "
         "weights"),
        ("agc", 7.5, "adaptive gradient clipping bounds each update relative to the weights"),
        ("clip_value", 6.0, "element-wise clipping also stops single huge gradient entries"),
        ("weight_decay", 3.0, "keeps weights from growing without bound"),
    ]
    if at_init:
        why = "values were non-finite at the first step: the init scale overflows"
        c += [("kaiming_init", 9.0, why), ("xavier_init", 8.5, why), ("lsuv_init", 8.0, why)]
    if not ctx.has_bn and not ctx.has_other_norm:
        c.append(("layernorm", 5.0, "normalisation bounds activations in every layer"))
        c.append(("batchnorm", 4.5, "normalisation bounds activations in every layer"))
    c += _transformer_cands(ctx, 7.0)
    return rank(c, ctx)


def rx_divergence(ctx: Context, n: Mapping[str, float], th: Thresholds) -> list[Prescription]:
    """Loss rising: the step is too large for the landscape."""
    return rank([*_transformer_cands(ctx, 8.0),
        ("lower_lr", 9.0, f"the loss rose {fmt(n.get('loss_ratio', float('nan')))}x above its "
         "start: the step size is past the stable limit"),
        ("clip_norm", 7.0, "caps the step when the gradient spikes"),
        ("agc", 6.0, "bounds each unit's update relative to its weight norm"),
        ("adam", 4.0 if not ctx.adaptive_optimizer else 1.0, "a normalised step size"),
        ("weight_decay", 3.0, "regularises weight growth"),
    ], ctx)


def rx_update_ratio(ctx: Context, n: Mapping[str, float], th: Thresholds) -> list[Prescription]:
    """Update/weight ratio out of range: too-fast layers need smaller steps, stalled ones larger."""
    c: list[Candidate] = []
    if n.get("n_high", 0) > 0:
        c += [
            ("lower_lr", 9.0, f"steps change weights by up to {fmt(n.get('max_ratio', 0.0))} of "
             f"their norm per step (rule of thumb ~1e-3)"),
            ("agc", 7.5, "adaptive gradient clipping bounds exactly this ratio per unit"),
            ("clip_norm", 6.0, "caps the global step"),
            ("weight_decay", 3.0, "regularises the weights whose updates are large"),
        ]
    if n.get("n_low", 0) > 0:
        c += [
            ("layerwise_lr", 8.0, f"some layers move by only {fmt(n.get('min_ratio', 0.0))} of "
             "their norm per step; a per-layer learning rate can lift them"),
            ("adam", 7.0 if not ctx.adaptive_optimizer else 2.0,
             "per-parameter normalisation gives every layer a similar relative step"),
            ("rprop", 6.0, "sign-based steps independent of gradient size"),
            ("vsgd", 4.0, "per-parameter adaptive step size"),
        ]
    return rank(c, ctx)


def rx_through_time(ctx: Context, n: Mapping[str, float], th: Thresholds, *,
                    exploding: bool, cell: str | None) -> list[Prescription]:
    """Gradients vanishing or exploding through time in a recurrent layer (``cell``: ``"RNN"``,
    ``"LSTM"``, ``"GRU"`` or ``None`` when unknown)."""
    span = f"over {int(n.get('time_steps', 0))} time steps" if n.get("time_steps") else ""
    c: list[Candidate] = []
    if exploding:
        c += [
            ("clip_norm", 9.0, "gradient norm clipping is the standard cure for exploding "
             "gradients through time (Pascanu et al. 2013): it bounds the step whatever the "
             "product of recurrent Jacobians"),
            ("truncated_bptt", 7.5, "back-propagating through fewer steps bounds the number of "
             "recurrent Jacobians multiplied " + span),
            ("orthogonal_recurrent_init", 7.0, "an orthogonal W_hh has spectral radius 1, so "
             "its linear part neither grows nor shrinks the gradient per step"),
            ("lower_lr", 6.0, "smaller steps keep the recurrent weights out of the region "
             "where the backward product explodes"),
            ("agc", 5.5, "adaptive clipping bounds each unit's update relative to its weights"),
        ]
        if cell == "RNN":
            c.append(("lstm", 5.0, "gated units bound the recurrent Jacobian by their gates"))
        return rank(c, ctx)
    f_mean = n.get("forget_gate_mean", float("nan"))
    if cell == "RNN" or cell is None:
        c += [
            ("lstm", 9.0, "the LSTM's cell state c_t = f c_{t-1} + i g gives the gradient an "
             "additive path through time (Hochreiter & Schmidhuber 1997): a vanilla RNN "
             "multiplies it by W_hh diag(phi') at every one of the " + span.replace("over ", "")
             .strip() + " steps" if span else "the LSTM's cell state gives the gradient an "
             "additive path through time (Hochreiter & Schmidhuber 1997)"),
            ("gru", 8.5, "the GRU's update gate interpolates h_t = (1-z) n + z h_{t-1}, an "
             "additive path for the gradient (Cho et al. 2014)"),
            ("orthogonal_recurrent_init", 7.0, "orthogonal W_hh keeps the linear part of each "
             "step norm-preserving (Saxe et al. 2014; Henaff et al. 2016)"),
            ("identity_recurrent_init", 6.5, "W_hh = I (with ReLU units: the IRNN of Le et al. "
             "2015) starts the network at a norm-preserving recurrence"),
        ]
    elif cell == "LSTM":
        why = ("a forget-gate bias of 1 keeps f_t near 1 early in training, so the cell state "
               "carries the gradient across many steps (Gers et al. 2000; Jozefowicz et al. "
               "2015)")
        if f_mean == f_mean:
            why += f"; the forget gate averages {fmt(f_mean)} here"
        c.append(("forget_gate_bias", 9.0 if not f_mean == f_mean or f_mean < 0.9 else 6.0, why))
        c.append(("orthogonal_recurrent_init", 6.5, "orthogonal recurrent weights per gate "
                  "keep the recurrence norm-preserving at the start"))
    else:  # GRU
        c.append(("orthogonal_recurrent_init", 7.5, "orthogonal recurrent weights per gate keep "
                  "the recurrence norm-preserving at the start"))
        c.append(("lstm", 5.0, "an LSTM with forget-gate bias 1 holds its cell state longer"))
    c += [
        ("adam", 5.5 if not ctx.adaptive_optimizer else 2.0,
         "per-parameter step normalisation helps the weights that receive the small, "
         "long-range part of the gradient"),
        ("clip_norm", 3.0, "clipping does not lift a vanishing gradient, but keeps larger "
         "learning rates safe"),
    ]
    return rank(c, ctx)


def rx_not_learning(ctx: Context, n: Mapping[str, float], th: Thresholds) -> list[Prescription]:
    """The loss stays at the trivial baseline: the steps do not reach the weights that matter
    (rate too small or too large, a bad init scale) -- or the targets carry no signal."""
    above = n.get("loss_end", 0.0) > n.get("trivial_loss", 0.0) * (1 + th.not_learning_margin)
    c: list[Candidate] = [
        ("adam", 8.0 if not ctx.adaptive_optimizer else 3.0,
         "normalised steps move every layer at a similar relative rate, whatever the gradient "
         "scale"),
        ("lsuv_init", 7.0, "LSUV sets every layer's output variance to 1 on data, so the signal "
         "reaches the output at init"),
        ("kaiming_init", 6.5 if ctx.rectifiers else 5.0,
         "He init keeps the forward signal and the gradient O(1) across ReLU layers"),
        ("critical_init", 6.0 if ctx.saturating else 4.5,
         "weights at the edge of chaos propagate signal through tanh/sigmoid depth"),
        ("lower_lr", 7.5 if above else 4.0,
         "the loss sits above the trivial baseline: steps this large overshoot" if above else
         "if the updates oscillate, a smaller rate lets the loss go down"),
        ("clip_norm", 4.0, "bounds spikes that undo progress"),
    ]
    c += _transformer_cands(ctx, 7.5)
    return rank(c, ctx)
