"""Non-private fine-tuning (NOT differentially private): minibatch Adam on the private data,

    theta <- Adam step on (1/|B|) sum_{i in B} loss(theta; z_i),

for a fixed number of epochs over shuffled minibatches, optionally keeping the epoch with the
lowest loss on PUBLIC validation data (early stopping, patience in epochs). It is the accuracy
ceiling that the private methods are measured against; its report says NOT PRIVATE.

``train_epochs`` is the epoch loop; DP-SGD runs the same loop with Opacus' model, optimizer
and Poisson-sampled loader.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader

from qem.baselines import baseline_result, check_requested_budget, torch_generators
from qem.checks import check_count, check_positive, parse_option
from qem.data import DataLike, as_dataset, batches, map_inputs, training_loader
from qem.errors import InvalidParameterError
from qem.finetune import FineTuneResult
from qem.losses import LossFn, check_per_example_loss
from qem.metrics import evaluate_loss
from qem.model_calls import call_model
from qem.parameters import check_finite_parameters
from qem.privacy.sensitivity import Adjacency
from qem.progress import progress_bar
from qem.timing import PhaseTimer


def train_epochs(
    model: nn.Module,
    loss_fn: LossFn,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    validation: DataLike | None = None,
    patience: int = 2,
    progress: bool = True,
    desc: str = "training",
) -> list[dict]:
    """Run ``epochs`` passes of: zero_grad, mean per-example loss of the batch, backward, step.
    ``loader`` yields (inputs, targets) batches (qem.data.training_loader).

    With ``validation`` (early stopping) the loss on it is recorded before the first epoch and
    after every epoch, training stops after ``patience`` epochs without improvement, and
    ``model`` is left at the best epoch. Returns one record per epoch (epoch, train_loss,
    validation_loss); train_loss is a statistic of the training data.
    """
    device = next(model.parameters()).device
    history: list[dict] = []
    best_loss, best_state, since_best = float("inf"), None, 0
    if validation is not None:
        best_loss = evaluate_loss(model.eval(), loss_fn, validation)
        best_state = copy.deepcopy(model.state_dict())
        history.append({"epoch": 0, "train_loss": None, "validation_loss": best_loss})
    for epoch in progress_bar(range(1, epochs + 1), desc=desc, enabled=progress, leave=True):
        model.train()
        total, count = 0.0, 0
        for inputs, targets in loader:
            inputs, targets = map_inputs(lambda t: t.to(device), inputs), targets.to(device)
            optimizer.zero_grad()
            losses = loss_fn(call_model(model, inputs), targets)
            losses.mean().backward()
            optimizer.step()
            total += float(losses.detach().double().sum())
            count += losses.shape[0]
        record = {"epoch": epoch, "train_loss": total / max(count, 1), "validation_loss": None}
        history.append(record)
        if validation is None:
            continue
        model.eval()
        record["validation_loss"] = evaluate_loss(model, loss_fn, validation)
        if record["validation_loss"] < best_loss:
            best_loss, since_best = record["validation_loss"], 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
        if since_best >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


def nonprivate(
    model: nn.Module,
    loss_fn: LossFn,
    public_data: DataLike,
    private_data: DataLike,
    *,
    epsilon: float | None = None,
    delta: float | None = None,
    adjacency: str = "replace_one",
    validation_data: DataLike | None = None,
    seed: int | None = None,
    progress: bool = True,
    lr: float = 1e-3,
    epochs: int = 5,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    early_stopping: bool = False,
    patience: int = 2,
) -> FineTuneResult:
    """Fine-tune a copy of ``model`` on ``private_data`` with Adam, WITHOUT any privacy.

    ``epsilon``/``delta`` are accepted for a uniform call signature, checked when given, and
    ignored: the report's epsilon is None. ``early_stopping`` keeps the epoch (0 = the input
    model) with the lowest mean loss on ``validation_data`` (``public_data`` when None).
    ``seed`` seeds the minibatch shuffling.
    """
    requested = check_requested_budget(epsilon, delta)
    adjacency = parse_option(Adjacency, adjacency, "adjacency")
    check_positive("lr", lr)
    batch_size = check_count("batch_size", batch_size)
    epochs = check_count("epochs", epochs)
    patience = check_count("patience", patience)
    if weight_decay < 0:
        raise InvalidParameterError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    check_finite_parameters(model)
    private = as_dataset(private_data, "private data", addressable=True)
    validation = None
    if early_stopping:
        validation = as_dataset(
            public_data if validation_data is None else validation_data, "validation data"
        )
    timer = PhaseTimer()
    with timer.phase("training"):
        trained = copy.deepcopy(model)
        probe_x, probe_y = next(iter(batches(private, 2)))
        with torch.no_grad():
            check_per_example_loss(loss_fn, call_model(trained.eval(), probe_x), probe_y)
        (shuffle,) = torch_generators(seed, ["cpu"])
        loader = training_loader(private, batch_size, shuffle=True, generator=shuffle)
        trainable = [p for p in trained.parameters() if p.requires_grad]  # frozen: left alone
        optimizer = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
        history = train_epochs(
            trained,
            loss_fn,
            loader,
            optimizer,
            epochs=epochs,
            validation=validation,
            patience=patience,
            progress=progress,
            desc="non-private fine-tuning",
        )
    hyperparameters = {
        "optimizer": "adam",
        "lr": lr,
        "epochs": epochs,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "early_stopping": early_stopping,
        "patience": patience if early_stopping else None,
    }
    return baseline_result(
        trained.eval(),
        "nonprivate",
        privacy="NOT PRIVATE: trained directly on the private data without noise or clipping",
        epsilon=None,
        delta=None,
        adjacency=adjacency.value,
        N=len(private),
        accountant=None,
        hyperparameters=hyperparameters,
        seed=seed,
        seconds=timer.seconds,
        requested_budget=requested,
        history=history,
    )
