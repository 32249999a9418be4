"""TensorBoard summaries of channel pruning (the structured twin of tfmot's ``PruningSummaries``).

tfmot's ``PruningSummaries`` reads tfmot's own wrappers, so it logs nothing for
:func:`keras_rebuild.prune_channels` models. :class:`PruningSummaries` logs,
for those models:

* ``pruning/channel_sparsity/<layer>``: the fraction of output channels pruned,
  for every wrapped layer that writes channels (Conv, Dense, ...);
* ``pruning/channel_sparsity_total``: pruned output channels of those layers
  over all their output channels;
* ``pruning/target_sparsity``: the schedule's sparsity at the current step (the
  one-shot ``sparsity`` for ``prune_channels(model, sparsity=...)``).

Example:
    >>> model.fit(x, y, epochs=5, callbacks=[kr.UpdatePruningStep(),
    ...                                       kr.PruningSummaries(log_dir="logs")])  # doctest: +SKIP

Then ``tensorboard --logdir logs``.
"""
from __future__ import annotations

import numbers
import os
from typing import Dict, Optional, Union

from keras_rebuild import schedules as _schedules
from keras_rebuild._compat import keras, tf
from keras_rebuild.errors import InvalidArgumentError, received
from keras_rebuild.handlers import get_handler

__all__ = ["PruningSummaries", "channel_sparsity"]


def channel_sparsity(model) -> Dict[str, float]:
    """``{layer path: fraction of output channels pruned}`` for the channel-writing wrapped layers.

    Also ``"total"``: the pruned output channels of those layers over all their
    output channels. Reads only the (small) mask variables.

    Args:
        model: A model returned by :func:`keras_rebuild.prune_channels`.

    Returns:
        A dict of floats in [0, 1]; ``{"total": 0.0}`` for a model without wrappers.
    """
    from keras_rebuild.wrappers import wrapped_layers

    out, pruned, total = {}, 0, 0
    for path, w in wrapped_layers(model).items():
        handler = get_handler(w.layer)
        if handler is None or getattr(handler, "kind", None) != "mixing" or w.out_channel_mask is None:
            continue
        _, keep_out = w.channel_masks()
        out[path] = float(1.0 - keep_out.mean())
        pruned += int((~keep_out).sum())
        total += int(keep_out.size)
    out["total"] = pruned / total if total else 0.0
    return out


class PruningSummaries(keras.callbacks.Callback):
    """Log each layer's channel sparsity, the total and the schedule's target to TensorBoard.

    Use it next to :class:`keras_rebuild.UpdatePruningStep`. The summaries go
    to ``<log_dir>/pruning`` (a run of their own beside Keras' ``TensorBoard``
    callback's ``train``/``validation``), at the training step of the
    wrappers' ``pruning_step``.

    Args:
        log_dir: Directory of the TensorBoard logs.
        update_freq: ``"epoch"`` (at the end of every epoch) or an integer
            ``N``: every ``N`` training steps as well. Logging reads the mask
            variables, so keep ``N`` in the hundreds for fast models.

    Raises:
        InvalidArgumentError: an empty ``log_dir``, or an ``update_freq`` that
            is neither ``"epoch"`` nor a positive integer.

    Example:
        >>> cb = kr.PruningSummaries("logs", update_freq=100)   # doctest: +SKIP
    """

    def __init__(self, log_dir: Union[str, os.PathLike], update_freq: Union[str, int] = "epoch"):
        super().__init__()
        self._supports_tf_logs = True
        if not isinstance(log_dir, (str, os.PathLike)) or not str(log_dir):
            raise InvalidArgumentError(f"Expected `log_dir` to be a non-empty path. Received: {received('log_dir', log_dir)}")
        if update_freq != "epoch" and (isinstance(update_freq, bool) or not isinstance(update_freq, numbers.Integral)
                                       or update_freq < 1):
            raise InvalidArgumentError(
                "Expected `update_freq` to be \"epoch\" or an integer >= 1 (training steps). "
                f"Received: {received('update_freq', update_freq)}"
            )
        self.log_dir = os.fspath(log_dir)
        self.update_freq = update_freq
        self._writer = None
        self._schedule = None
        self._one_shot: Optional[float] = None
        self._steps_seen = 0

    def on_train_begin(self, logs=None):
        from keras_rebuild.wrappers import _deserialize_schedule, _with_frequency, wrapped_layers

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "pruning"))
        self._schedule, self._one_shot = None, None
        wrappers = wrapped_layers(self.model)
        if wrappers:
            first = next(iter(wrappers.values()))
            params = first.pruning_params
            if params.get("mode") == "schedule" and params.get("pruning_schedule"):
                runtime = first._runtime
                schedule = runtime.schedule if runtime is not None and runtime.schedule is not None else None
                if schedule is None:
                    try:
                        schedule = _deserialize_schedule(params["pruning_schedule"])
                    except InvalidArgumentError:
                        schedule = None  # a custom schedule class nobody registered: no target curve
                self._schedule = _with_frequency(_schedules.get(schedule), params.get("frequency")) \
                    if schedule is not None else None
            elif params.get("mode") == "sparsity" and isinstance(params.get("sparsity"), numbers.Real):
                self._one_shot = float(params["sparsity"])

    def on_train_batch_end(self, batch, logs=None):
        if self.update_freq == "epoch":
            return
        self._steps_seen += 1
        if self._steps_seen % self.update_freq == 0:
            self._write()

    def on_epoch_end(self, epoch, logs=None):
        self._write()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def _step(self) -> int:
        from keras_rebuild.wrappers import wrapped_layers

        wrappers = wrapped_layers(self.model)
        if not wrappers:
            return int(keras.backend.get_value(self.model.optimizer.iterations)) if self.model.optimizer else 0
        return max(0, min(int(v) for v in keras.backend.batch_get_value([w.pruning_step for w in wrappers.values()])))

    def _write(self):
        if self._writer is None:
            return
        step = self._step()
        values = channel_sparsity(self.model)
        target = self._one_shot
        if self._schedule is not None:
            target = float(self._schedule(step)[1]) if isinstance(self._schedule, _schedules.PruningSchedule) \
                else float(tf.convert_to_tensor(self._schedule(tf.constant(step, tf.int64))[1]))
        with self._writer.as_default(step=step):
            for path, value in values.items():
                name = "pruning/channel_sparsity_total" if path == "total" else f"pruning/channel_sparsity/{path}"
                _scalar(name, value, step)
            if target is not None:
                _scalar("pruning/target_sparsity", target, step)
        self._writer.flush()


def _scalar(name, value, step):
    """``tf.summary.scalar`` without needing the tensorboard package: the same event, scalars plugin."""
    metadata = tf.compat.v1.SummaryMetadata(
        plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))
    tf.summary.write(name, tf.constant(value, tf.float32), step=step, metadata=metadata)
