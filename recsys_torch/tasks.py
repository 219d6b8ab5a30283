"""Tasks: what a batch's loss is and how a model is evaluated. ``rating`` (MSE; RMSE/MAE) or
``ranking`` (BPR or sampled softmax over sampled negatives, or a full softmax over every item;
full-ranking metrics at K)."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from recsys_torch import losses, metrics
from recsys_torch.data.interactions import Interactions
from recsys_torch.checks import number
from recsys_torch.errors import ConfigError
from recsys_torch.models.base import FactorizationModel, Side


def _rows(penalty, n: int, device) -> torch.Tensor:
    """A per-example penalty as a ``[n]`` tensor (models without penalties give the float 0.0)."""
    return torch.as_tensor(penalty, device=device).expand(n) if not torch.is_tensor(penalty) or penalty.dim() == 0 \
        else penalty


def pair_scores(model: FactorizationModel, u: Side, i: Side) -> torch.Tensor:
    """Scores of a user side ``[B]`` against item sides ``[B]`` or ``[B, n]``."""
    score = model.global_bias + u.bias.view(-1, *([1] * (i.bias.dim() - 1))) + i.bias
    if u.vector is not None and i.vector is not None:
        uv = u.vector if i.vector.dim() == 2 else u.vector.unsqueeze(1)
        score = score + (uv * i.vector).sum(-1)
    return score


class Task:
    """What a task is to the trainer, evaluation and serving; :class:`RatingTask` and
    :class:`RankingTask` fill it in."""

    name = "task"
    monitor = "rmse"  # the validation metric that early stopping and sweeps watch by default
    mode = "min"  # whether lower (min) or higher (max) values of the monitor are better
    implicit = False  # the training rows are positives to rank, not ratings to predict
    threshold = None  # ratings at or above it are positives (ranking tasks)
    loss_name = "mse"
    time_decay = None  # half-life in days of an interaction's weight (None: no decay)
    weighted = False  # whether the training rows carry weights (set by setup)
    wide_steps = False  # a step's work grows with the catalog (worth several threads)

    def prepare_data(self, inter: Interactions) -> Interactions:
        return self.decayed(inter)

    def negatives(self, inter: Interactions) -> Interactions | None:
        """The rows of ``inter`` this task trains on as explicit negatives (none by default)."""
        return None

    def decayed(self, inter: Interactions) -> Interactions:
        """With ``time_decay`` (days), each row's weight times 0.5 ** (age / time_decay), its age counted
        from the latest interaction of the data."""
        if self.time_decay is None:
            return inter
        if inter.timestamps is None:
            raise ConfigError("task.time_decay down-weights old interactions, and these ratings have no timestamps")
        age_days = (inter.timestamps.max() - inter.timestamps).double() / 86400.0
        decay = torch.pow(0.5, age_days / self.time_decay).float()
        return replace(inter, weights=inter.row_weights() * decay)

    def setup(self, train: Interactions, device: torch.device, generator: torch.Generator) -> None:
        self.weighted = train.weights is not None

    def training_rows(self, data: Interactions, times: bool = False) -> tuple[torch.Tensor, ...]:
        """The tensors an epoch shuffles and slices into batches for :meth:`loss` (the first holds
        the user of each row; weighted data adds each row's weight). ``times`` (a model that
        :attr:`~.FactorizationModel.uses_time`): each row's weight (1 for unweighted data) and then its
        timestamp, where the data has them."""
        rows = (data.users, data.items, data.ratings)
        if times and data.timestamps is not None:
            return rows + (data.row_weights(), data.timestamps)
        return rows + (data.weights,) if data.weights is not None else rows

    def metric_names(self) -> list[str]:
        """The metrics :meth:`evaluate` reports (segments such as ``cold/...`` aside)."""
        raise NotImplementedError

    def validate(self, model, val: Interactions, train: Interactions, batch_size: int = 65536) -> dict:
        """The metrics early stopping watches (by default :meth:`evaluate` of the validation part)."""
        return self.evaluate(model, val, train, batch_size=batch_size)

    def config(self) -> dict:
        """The task as a config node (``_target_`` and settings): what rebuilds it for serving."""
        return {"_target_": f"{type(self).__module__}.{type(self).__qualname__}"}


class RatingTask(Task):
    """Explicit ratings: minimize MSE plus the model's L2 penalty; report RMSE and MAE."""

    name = "rating"

    def __init__(self, time_decay: float | None = None) -> None:
        self.time_decay = number("task.time_decay", time_decay, float, above=0, allow_none=True)

    def config(self) -> dict:
        return {**super().config(), "time_decay": self.time_decay}

    def metric_names(self) -> list[str]:
        return ["rmse", "mae"]

    def loss(self, model: FactorizationModel, users, items, ratings, weights=None, times=None) -> torch.Tensor:
        """MSE plus the L2 penalty of the rows used, both per example and weighted by ``weights``."""
        scores, penalty, others = model.training_scores(users, items) if times is None else \
            model.training_scores(users, items, times)
        loss = losses.mse(scores, ratings, weights) + losses.weighted_mean(_rows(penalty, len(users), scores.device),
                                                                           weights)
        for weight, other in others:
            loss = loss + weight * losses.mse(other, ratings, weights)
        return loss

    def evaluate(self, model, data: Interactions, train: Interactions, exclude=(), batch_size: int = 65536) -> dict:
        return metrics.rating_metrics(model, data, train, batch_size)


# the model's L2 settings: the Gramian loss has its own (task.reg), so under it these change nothing
MODEL_L2_KEYS = ("reg", "reg_bias", "reg_exponent", "reg_features", "reg_implicit", "reg_day_bias", "reg_day_scale")


def warn_unused_model_settings(loss: str | None, keys) -> None:
    """Log a WARNING naming the model settings among ``keys`` (the ones a user set, without
    ``model.``) that a task with ``loss`` ignores: the Gramian loss's L2 is ``task.reg``, not the model's."""
    unused = [f"model.{k}" for k in keys if k in MODEL_L2_KEYS]
    if loss != "gramian" or not unused:
        return
    verb = "changes" if len(unused) == 1 else "change"
    logging.getLogger("recsys_torch").warning(
        f"{', '.join(unused)} {verb} nothing under task.loss=gramian: its L2 is task.reg (times (count + "
        "gramian_weight x the other side's size) ^ task.reg_frequency); the model's L2 settings apply to the "
        "other ranking losses and to ratings")


class RankingTask(Task):
    """Implicit feedback: positives are ratings at or above ``threshold`` (every interaction when
    ``threshold`` is None); each positive is contrasted with ``n_negatives`` sampled items."""

    name = "ranking"
    mode = "max"
    implicit = True
    MAX_REDRAWS = 50  # a user with 3/4 of the sampling mass as positives keeps 1 draw in 2e6
    GPU_REDRAWS = 8
    EVAL_CELLS = 1 << 24  # user x item scores held at once when evaluating (bounded memory)
    # bpr and softmax contrast each positive with sampled negatives; full_softmax with every item
    # (exact, no sampler: a batch costs batch x catalog scores). user_softmax and gramian are
    # whole-catalog losses at per-user cost: a batch is a set of users (trainer.batch_size counts users).
    LOSSES = ("bpr", "softmax", "full_softmax", "user_softmax", "gramian")
    USER_BATCHED = ("user_softmax", "gramian")

    def __init__(self, threshold: float | None = 4.0, loss: str = "gramian", n_negatives: int = 1,
                 sampler: str = "uniform", reject_positives: bool = True, ks=(10,),
                 monitor: str | None = None, eval_batch_size: int = 1024, confidence: float = 1.0,
                 gramian_weight: float = 0.3, reg: float = 0.015, reg_frequency: float = 1.0,
                 val_sample: int | None = None, time_decay: float | None = None, negative_weight: float = 0.6) -> None:
        if loss not in self.LOSSES:
            raise ConfigError(f"task.loss must be one of {', '.join(map(repr, self.LOSSES))}, got {loss!r}")
        if sampler not in ("uniform", "popularity"):
            raise ConfigError(f"task.sampler must be 'uniform' or 'popularity', got {sampler!r}")
        self.n_negatives = number("task.n_negatives", n_negatives, int, 1)
        self.threshold = number("task.threshold", threshold, float, allow_none=True)
        self.loss_name = loss
        self.sampler = sampler
        self.reject_positives = bool(reject_positives)
        self.ks = sorted(number("task.ks", k, int, 1) for k in ks)
        if not self.ks:
            raise ConfigError(f"task.ks must be a list of positive integers, got {list(ks)}")
        self.monitor = monitor or f"ndcg@{self.ks[0]}"
        self.eval_batch_size = number("task.eval_batch_size", eval_batch_size, int, 1)
        self.confidence = number("task.confidence", confidence, float, above=0)
        self.gramian_weight = number("task.gramian_weight", gramian_weight, float, above=0)
        self.negative_weight = number("task.negative_weight", negative_weight, float, 0)
        self.reg = number("task.reg", reg, float, 0)
        self.reg_frequency = number("task.reg_frequency", reg_frequency, float)
        self.val_sample = number("task.val_sample", val_sample, int, 1, allow_none=True)
        self.time_decay = number("task.time_decay", time_decay, float, above=0, allow_none=True)

    def metric_names(self) -> list[str]:
        return [f"{m}@{k}" for k in self.ks for m in metrics.RANKING_METRICS]

    def config(self) -> dict:
        return {**super().config(), "threshold": self.threshold, "loss": self.loss_name,
                "n_negatives": self.n_negatives, "sampler": self.sampler, "reject_positives": self.reject_positives,
                "ks": list(self.ks), "monitor": self.monitor, "eval_batch_size": self.eval_batch_size,
                "confidence": self.confidence, "gramian_weight": self.gramian_weight, "reg": self.reg,
                "reg_frequency": self.reg_frequency, "val_sample": self.val_sample, "time_decay": self.time_decay,
                "negative_weight": self.negative_weight}

    @property
    def wide_steps(self) -> bool:
        return self.loss_name in (*self.USER_BATCHED, "full_softmax")

    def training_rows(self, data: Interactions, times: bool = False) -> tuple[torch.Tensor, ...]:
        """Positives, one per row; for the user-batched losses the users that have positives, so that
        a batch is a set of users whose logits (or Gramian terms) are computed once each. No
        timestamps: a score's part that depends on the time alone (a user's bias that day) cannot
        change a ranking."""
        if self.loss_name in self.USER_BATCHED:
            return (torch.nonzero(self.pos_indptr[1:] > self.pos_indptr[:-1]).squeeze(1),)
        return super().training_rows(data)

    def prepare_data(self, inter: Interactions) -> Interactions:
        """Keep the positives and set every rating to 1 (weights and their time decay stay)."""
        inter = self.decayed(inter)
        if self.threshold is not None:
            inter = inter.subset(inter.ratings >= float(self.threshold))
        return inter.__class__(**{**inter.__dict__, "ratings": torch.ones(len(inter))})

    def negatives(self, inter: Interactions) -> Interactions | None:
        """The ratings below the threshold, for the Gramian loss (``negative_weight`` > 0): the user saw
        these items and did not like them, which says more than an item never rated. Their weights
        decay with ``time_decay`` as the positives' do."""
        if self.threshold is None or self.loss_name != "gramian" or self.negative_weight == 0:
            return None
        inter = self.decayed(inter)
        return inter.subset(inter.ratings < float(self.threshold))

    def setup(self, train: Interactions, device: torch.device, generator: torch.Generator) -> None:
        super().setup(train, device, generator)
        self.n_items = train.n_items
        self.generator = generator
        counts = train.item_counts().to(device).double()
        if self.sampler == "popularity":
            prob = counts / counts.sum()
        else:
            prob = torch.full((self.n_items,), 1.0 / self.n_items, dtype=torch.float64, device=device)
        self.cdf = torch.cumsum(prob, 0).float()
        self.log_q = torch.log(prob.clamp(min=1e-12)).float()
        users, items = train.users.to(device), train.items.to(device)
        keys = users * self.n_items + items
        order = torch.argsort(keys)
        self.positive_keys = keys[order]
        self.all_items = torch.arange(self.n_items, device=device)
        # each user's positives as CSR (users in code order): the user-batched losses gather from it
        user_counts = torch.bincount(users, minlength=train.n_users)
        self.pos_indptr = torch.cat([user_counts.new_zeros(1), torch.cumsum(user_counts, 0)])
        self.pos_items = items[order]
        self.pos_weight = train.row_weights().to(device)[order].float()
        self._observed(train, device)
        self.n_users = train.n_users
        self.n_active_users = n_active_users = max(int((user_counts > 0).sum()), 1)
        self.nnz = max(float(self.pos_weight.sum()), 1e-12)
        # Rendle et al. 2021: an entity's L2 grows with its count plus the all-pairs weight times the other
        # side's size, to the power reg_frequency (0: the model's own penalty as it is)
        gw, nu = self.gramian_weight, self.reg_frequency
        self.user_reg_weight = (user_counts.double() + gw * int((counts > 0).sum())).pow(nu).float()
        self.item_reg_weight = (counts + gw * n_active_users).pow(nu).float()

    def _observed(self, train: Interactions, device: torch.device) -> None:
        """The Gramian loss's observed pairs per user (CSR, users in code order): the positives, target 1
        and weight ``confidence`` (times the row's weight), and the explicit negatives of ``train``
        (:attr:`~recsys_torch.data.interactions.Interactions.negatives`), target 0 and weight
        ``negative_weight`` (times the row's weight), on top of every pair's ``gramian_weight``."""
        weight = self.confidence * self.pos_weight
        neg = train.negatives
        if neg is not None and len(neg):  # a user or item without positives is never solved nor ranked
            known_items = torch.bincount(self.pos_items.cpu(), minlength=train.n_items) > 0
            neg = neg.subset((self.pos_indptr.diff().cpu()[neg.users.cpu()] > 0) & known_items[neg.items.cpu()])
        if neg is None or len(neg) == 0 or self.negative_weight == 0:
            self.obs_indptr, self.obs_items, self.obs_weight = self.pos_indptr, self.pos_items, weight
            self.obs_target = None  # every target 1: the solvers skip the per-pair targets
            self.n_negatives_trained = 0
            return
        n_users = train.n_users
        pos_users = torch.repeat_interleave(torch.arange(n_users, device=device), self.pos_indptr.diff())
        users = torch.cat([pos_users, neg.users.to(device)])
        items = torch.cat([self.pos_items, neg.items.to(device)])
        order = torch.argsort(users * self.n_items + items)  # CSR: each row's columns in order
        counts = torch.bincount(users, minlength=n_users)
        self.obs_indptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self.obs_items = items[order]
        self.obs_weight = torch.cat([weight, self.negative_weight * neg.row_weights().to(device).float()])[order]
        self.obs_target = torch.cat([torch.ones_like(weight), weight.new_zeros(len(neg))])[order]
        self.n_negatives_trained = len(neg)

    def _is_positive(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Per (user, item) pair of equal-shaped tensors: is it a training positive?"""
        keys = users * self.n_items + items
        pos = torch.searchsorted(self.positive_keys, keys).clamp(max=len(self.positive_keys) - 1)
        return self.positive_keys[pos] == keys

    def _draw(self, n: int) -> torch.Tensor:
        u = torch.rand(n, generator=self.generator, device=self.cdf.device)
        return torch.searchsorted(self.cdf, u).clamp(max=self.n_items - 1)

    def sample(self, users: torch.Tensor) -> torch.Tensor:
        """``[B, n_negatives]`` item codes. With ``reject_positives`` each draw that hits a known
        positive is redrawn, up to ``MAX_REDRAWS`` times; each round redraws and checks only the
        draws still rejected, so a round costs little."""
        neg = self._draw(len(users) * self.n_negatives).view(len(users), self.n_negatives)
        if not self.reject_positives:
            return neg
        if neg.is_cuda:
            # nonzero() would stall the stream on a host sync every step: redraw whole-tensor instead,
            # a fixed number of rounds (each leaves a positive with the probability of hitting one)
            owners = users.unsqueeze(1).expand_as(neg)
            for _ in range(self.GPU_REDRAWS):
                fresh = self._draw(neg.numel()).view_as(neg)
                neg = torch.where(self._is_positive(owners, neg), fresh, neg)
            return neg
        rows, cols = self._is_positive(users.unsqueeze(1).expand_as(neg), neg).nonzero(as_tuple=True)
        for _ in range(self.MAX_REDRAWS):
            if len(rows) == 0:
                break
            fresh = self._draw(len(rows))
            neg[rows, cols] = fresh
            still = self._is_positive(users[rows], fresh)
            rows, cols = rows[still], cols[still]
        return neg

    @staticmethod
    def _rows_of(users: torch.Tensor, indptr: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The entries of a batch of users in a per-user CSR (``indptr`` and its ``columns``): the row in
        the batch of each entry, each column's values, grouped by row, and the row pointers of that CSR."""
        starts = indptr.index_select(0, users)
        lengths = indptr.index_select(0, users + 1) - starts
        rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), lengths)
        crow = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
        index = starts.index_select(0, rows) + torch.arange(len(rows), device=users.device) - crow[:-1].index_select(0, rows)
        return (rows, *(c.index_select(0, index) for c in columns), crow)

    def _positives_of(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The positives of a batch of users: (row in the batch, item, weight) per positive, grouped by
        row, and the row pointers of that CSR layout."""
        return self._rows_of(users, self.pos_indptr, self.pos_items, self.pos_weight)

    def _observed_of(self, users: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The Gramian loss's observed pairs of a batch of users: (row in the batch, item, weight, target)
        per pair, grouped by row, and the row pointers (:meth:`_observed`); target None when every one
        is 1 (no explicit negatives)."""
        if self.obs_target is None:
            rows, items, weight, crow = self._rows_of(users, self.obs_indptr, self.obs_items, self.obs_weight)
            return rows, items, weight, None, crow
        return self._rows_of(users, self.obs_indptr, self.obs_items, self.obs_weight, self.obs_target)

    def _user_softmax(self, model: FactorizationModel, users: torch.Tensor) -> torch.Tensor:
        """The full softmax with each user's logits computed once: the same loss (and gradient) as
        ``full_softmax`` over exactly these users' positives, each positive weighing one (times its
        weight), at the cost of one row of logits per user instead of per positive."""
        u = model.user_side(users)
        every = model.item_side(self.all_items)
        logits = u.bias.unsqueeze(1) + every.bias.unsqueeze(0)  # the global bias cancels in a softmax
        if u.vector is not None and every.vector is not None:
            logits = logits + u.vector @ every.vector.T
        rows, items, weight, _ = self._positives_of(users)
        loss = losses.user_softmax(logits, rows, items, weight)
        u_penalty = torch.as_tensor(u.penalty, device=logits.device).expand(len(users)).index_select(0, rows)
        i_penalty = torch.as_tensor(every.penalty, device=logits.device).expand(self.n_items).index_select(0, items)
        return loss + ((u_penalty + i_penalty) * weight).sum() / weight.sum()

    def _gramian(self, model: FactorizationModel, users: torch.Tensor) -> torch.Tensor:
        """The iALS objective (Hu et al. 2008; Rendle et al. 2021) by gradient descent, never building
        the user x item matrix: ``confidence`` x (1 - s)^2 over the positives, ``negative_weight`` x s^2
        over the explicit negatives, plus ``gramian_weight`` x s^2 over every (user, item) pair, where
        s = <p_u, q_i>. The all-pairs sum of a user is p_u^T G p_u with
        G = Q^T Q the d x d Gramian of the item vectors, so a batch costs O(batch x d^2 + items x d^2 +
        positives x d). Normalized so that an epoch's expected loss is the objective divided by the
        number of positives. The L2 is this loss's own
        (``task.reg``, as iALS's regularization belongs to the method): ``reg`` x (count + gramian_weight x
        the other side's size) ^ reg_frequency x the squared norm of each vector; the model's ``reg``
        applies to the other losses."""
        u = model.user_side(users)
        every = model.item_side(self.all_items)
        if u.vector is None or every.vector is None:
            raise ConfigError("task.loss=gramian fits user and item vectors: use a model with embeddings (mf, content, "
                              "hybrid)")
        # biases stay out: a user's bias never changes their ranking, and an item bias fitted to this
        # objective only learns popularity (it lowered validation NDCG)
        p, q = u.vector, every.vector
        gram = q.T @ q
        all_pairs = ((p @ gram) * p).sum()
        _, items, weight, target, crow = self._observed_of(users)
        observed = losses.sparse_squared_error(p.float(), q.float(), crow, items, weight,
                                               1.0 if target is None else target)
        fit = observed + self.gramian_weight * all_pairs
        share = len(users) / self.n_active_users  # this batch's share of an epoch (the item L2 is once per epoch)
        reg = (self.user_reg_weight.index_select(0, users) * p.pow(2).sum(1)).sum()
        reg = self.reg * (reg + share * (self.item_reg_weight * q.pow(2).sum(1)).sum())
        return (fit + reg) / (share * self.nnz)

    def loss(self, model: FactorizationModel, users, items=None, ratings=None, weights=None) -> torch.Tensor:
        if self.loss_name == "user_softmax":
            return self._user_softmax(model, users)
        if self.loss_name == "gramian":
            return self._gramian(model, users)
        if self.loss_name == "full_softmax":
            return self._full_softmax(model, users, items, weights)
        neg = self.sample(users)
        u = model.user_side(users)
        p = model.item_side(items)
        n = model.item_side(neg.reshape(-1))
        n = Side(None if n.vector is None else n.vector.view(*neg.shape, -1), n.bias.view(neg.shape),
                 torch.as_tensor(n.penalty).reshape(-1))
        pos_s, neg_s = pair_scores(model, u, p), pair_scores(model, u, n)
        if self.loss_name == "bpr":
            loss = losses.bpr(pos_s, neg_s, weights)
        else:
            loss = losses.sampled_softmax(pos_s, neg_s, self.log_q[items], self.log_q[neg], weights)
        b, device = len(users), pos_s.device
        penalty = _rows(u.penalty, b, device) + _rows(p.penalty, b, device)
        penalty = penalty + _rows(n.penalty, neg.numel(), device).view(neg.shape).sum(1)
        return loss + losses.weighted_mean(penalty, weights)

    def _full_softmax(self, model: FactorizationModel, users, items, weights=None) -> torch.Tensor:
        """Cross-entropy of each positive against the whole catalog; the L2 penalty covers the rows
        the batch's pairs use, as for the sampled losses' positives."""
        u = model.user_side(users)
        every = model.item_side(self.all_items)
        logits = u.bias.unsqueeze(1) + every.bias.unsqueeze(0)  # the global bias cancels in a softmax
        if u.vector is not None and every.vector is not None:
            logits = logits + u.vector @ every.vector.T
        loss = losses.full_softmax(logits, items, weights)
        b, device = len(users), logits.device
        penalty = _rows(u.penalty, b, device) + _rows(every.penalty, self.n_items, device).index_select(0, items)
        return loss + losses.weighted_mean(penalty, weights)

    def fold_in_penalty(self, n_positives: int, n_candidates: int, reg: float, reg_exponent: float) -> float:
        """The L2 weight on a folded-in user's vector, as training weighed a user with ``n_positives``:
        the Gramian loss's own (``reg`` x (n + gramian_weight x the catalog) ^ reg_frequency), else the
        model's ``reg`` x n ^ (1 - reg_exponent)."""
        n = max(n_positives, 1)
        if self.loss_name == "gramian":
            return self.reg * (n + self.gramian_weight * n_candidates) ** self.reg_frequency + 1e-6
        return reg * n ** (1.0 - reg_exponent) + 1e-6

    def fold_in_loss(self, scores: torch.Tensor, positives: torch.Tensor,
                     negatives: torch.Tensor | None = None) -> torch.Tensor:
        """A new user's training loss against every candidate item (``scores`` ``[n]``; ``positives``
        the indices of the user's positives, ``negatives`` of their explicit negatives, which only the
        Gramian loss uses), summed over the positives."""
        n = len(positives)
        if self.loss_name == "gramian":  # confidence on the positives, every item's squared score
            loss = self.confidence * (1.0 - scores[positives]).pow(2).sum() + self.gramian_weight * scores.pow(2).sum()
            if negatives is not None and len(negatives) and self.negative_weight:
                loss = loss + self.negative_weight * scores[negatives].pow(2).sum()
            return loss
        if self.loss_name == "bpr":  # each positive against every other item
            negative = torch.ones_like(scores, dtype=torch.bool)
            negative[positives] = False
            return losses.bpr(scores[positives], scores[negative].expand(n, -1)) * n
        return losses.user_softmax(scores.unsqueeze(0), torch.zeros_like(positives), positives) * n

    def validate(self, model, val: Interactions, train: Interactions, batch_size: int | None = None) -> dict:
        """With ``val_sample``, a fixed seeded sample of that many validation users (the same every
        epoch; ``n_users`` says how many), so that early stopping stays cheap on large data."""
        if self.val_sample is not None:
            users = torch.unique(val.users.cpu())
            if len(users) > self.val_sample:
                chosen = users[torch.randperm(len(users), generator=torch.Generator().manual_seed(0))[:self.val_sample]]
                val = val.subset(torch.isin(val.users.cpu(), chosen))
        return self.evaluate(model, val, train, batch_size=batch_size)

    def evaluate(self, model, data: Interactions, train: Interactions, exclude=(), batch_size: int | None = None) -> dict:
        candidates = train.known_items().cpu()
        if model.scores_unknown_items:
            candidates = torch.ones_like(candidates)
        # the trainer passes its pair-scoring batch size; a ranking chunk is users x every item
        users_per_chunk = min(batch_size or self.eval_batch_size, max(1, self.EVAL_CELLS // max(train.n_items, 1)))
        return metrics.ranking_metrics(model, data, [train, *exclude], train, self.ks, users_per_chunk, candidates)
