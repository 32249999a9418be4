"""Recover the accuracy of a pruned model: fine-tuning, distillation, BN recalibration.

Two public functions, for tf_keras models and Keras 3 models on every backend:

* ``recover(model, x, y, teacher=..., **fit_kwargs)``: a drop-in replacement
  for ``model.fit`` that optionally distils from a teacher (usually the
  unpruned model) and optionally re-estimates BatchNormalization statistics
  first.
* ``recalibrate_batchnorm(model, x)``: re-estimate the moving mean/variance of
  every BatchNormalization layer (nested models included) on a few batches,
  without touching any other weight.

This module checks the arguments and hands the work to the model's flavour:
:mod:`keras_rebuild.recover._tf_keras` (TensorFlow + tf_keras) or
:mod:`keras_rebuild.recover._keras3` (``keras.ops`` only, any backend); the
distillation plan (which outputs are classification, logits or
probabilities) is shared, in :mod:`keras_rebuild.recover._common`. Importing
this module imports neither Keras nor TensorFlow.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

from keras_rebuild.backends import same_flavour
from keras_rebuild.errors import InvalidArgumentError, InvalidArgumentTypeError, received
from keras_rebuild.recover._common import (
    DEFAULT_DISTILLATION_WEIGHT,
    DEFAULT_RECALIBRATION_STEPS,
    DEFAULT_TEMPERATURE,
    check_compiled,
    check_steps,
    check_temperature,
    check_weight,
    keras_of,
)

__all__ = ["recover", "recalibrate_batchnorm"]

_IMPLEMENTATIONS = {"tf_keras": "keras_rebuild.recover._tf_keras", "keras3": "keras_rebuild.recover._keras3"}


def _implementation(model):
    """The recovery module of a model's flavour (imported on first use)."""
    from keras_rebuild.backends import flavour_of

    return importlib.import_module(_IMPLEMENTATIONS[flavour_of(model)])


def recalibrate_batchnorm(
    model: "keras.Model",
    x: Any,
    *,
    steps: Optional[int] = DEFAULT_RECALIBRATION_STEPS,
    batch_size: int = 32,
    seed: int = 0,
) -> int:
    """Re-estimate the moving statistics of every BatchNormalization layer.

    After pruning (or any weight change) the moving mean/variance stored in
    BatchNormalization layers no longer describe the activations they see, and
    inference-mode accuracy collapses even when the weights are good. This
    function runs the model in training mode on up to ``steps`` batches and
    replaces each layer's ``moving_mean`` / ``moving_variance`` by the exact
    statistics of all the samples seen (a cumulative average pooled over
    batches, like PyTorch's ``update_bn`` with ``momentum=None``; the old
    statistics are discarded). As in training, each BatchNormalization layer
    normalises with batch statistics while the statistics are gathered.

    Every layer that is an instance of ``keras.layers.BatchNormalization``
    (or tf_keras' ``SyncBatchNormalization``) is recalibrated, including layers inside
    nested models and layers that were frozen with ``trainable=False``.
    Nothing else changes: all other weights are bit-identical afterwards
    (they are checked and restored if a layer updated state in training mode).
    The model is modified in place.

    Args:
        model: A `keras.Model`, compiled or not.
        x: Input data: NumPy arrays or tensors (or a list/dict of them for
            multi-input models), a `tf.data.Dataset` of batches (``x`` or
            ``(x, y[, sample_weight])`` elements, like `fit`), a
            `keras.utils.Sequence` (`keras.utils.PyDataset`), on Keras 3 a
            torch ``DataLoader``, or an iterator of batches (it is consumed).
            Arrays are shuffled with ``seed`` first; datasets are read in order.
        steps: Number of batches to use; ``None`` for one full pass.
        batch_size: Batch size when ``x`` holds arrays.
        seed: Seed of the shuffle of array inputs.

    Returns:
        The number of BatchNormalization layers recalibrated (0 when the model
        has none; a warning is logged then).

    Raises:
        NotAModelError: If ``model`` is not a `keras.Model`.
        InvalidArgumentError: If ``steps`` or ``batch_size`` is not positive,
            ``x`` is empty, or ``x`` is an infinite dataset and ``steps=None``.
        InvalidArgumentTypeError: If ``x`` is of an unsupported type.

    Example:
        >>> import keras_rebuild as kr
        >>> from keras_rebuild.recover import recalibrate_batchnorm
        >>> (x, y), _ = kr.load_digits()
        >>> model = kr.digits_cnn(width=8, flavour="keras3")
        >>> recalibrate_batchnorm(model, x, steps=5, batch_size=64)
        3
    """
    keras_of(model, "model")
    steps = check_steps(steps, "steps", allow_none=True)
    batch_size = check_steps(batch_size, "batch_size")
    return _implementation(model).recalibrate_batchnorm(model, x, steps, batch_size, seed)


def recover(
    model: "keras.Model",
    x: Any = None,
    y: Any = None,
    *,
    teacher: Optional["keras.Model"] = None,
    distillation_weight: float = DEFAULT_DISTILLATION_WEIGHT,
    temperature: float = DEFAULT_TEMPERATURE,
    recalibrate_bn: bool = False,
    recalibration_steps: int = DEFAULT_RECALIBRATION_STEPS,
    **fit_kwargs: Any,
) -> "keras.callbacks.History":
    """Fine-tune a (pruned) model to recover accuracy, optionally distilling.

    Works the same on tf_keras models and on Keras 3 models with the
    TensorFlow, JAX or torch backend.

    A drop-in replacement for ``model.fit``: ``x``, ``y`` and every keyword
    argument of `fit` (``batch_size``, ``epochs``, ``validation_data``,
    ``validation_split``, ``callbacks``, ``class_weight``, ``sample_weight``,
    ``initial_epoch``, ``steps_per_epoch``, ``verbose``...) are passed through
    unchanged, and all input kinds `fit` accepts work (NumPy arrays,
    `tf.data.Dataset`, generators, `keras.utils.Sequence`, and on Keras 3
    `keras.utils.PyDataset` and torch ``DataLoader``). The model is
    trained **in place**, exactly like `fit`: with its own compiled optimizer
    (state and iteration count carry on), its compiled loss as the hard-label
    loss and its compiled metrics. The returned `History`'s ``.model`` is
    ``model``, and callbacks see ``model`` (so ``ModelCheckpoint`` saves the
    student, never a wrapper).

    **Distillation** (``teacher=`` given, usually the unpruned model). The
    student minimises::

        (1 - a) * hard_loss + a * distillation_loss + regularization

    with ``a = distillation_weight``. ``distillation_loss`` sums one term per
    output, outputs of student and teacher being matched by position (their
    count and shapes must agree):

    * classification outputs: ``T**2 * KL(softmax(z_t / T) || softmax(z_s / T))``
      (Hinton et al., 2015; ``T = temperature``), per sample, with the
      Bernoulli KL per unit for sigmoid outputs;
    * regression outputs: mean squared error to the teacher's output.

    Sample weights (and ``class_weight``) weight the distillation term like
    they weight Keras losses. The teacher is frozen: it is called with
    ``training=False`` (dropout off, BatchNormalization statistics untouched)
    and none of its weights is updated. If the data carry no labels (``x``
    only), the student learns from the teacher alone.

    How an output is classified, per position (student first, then teacher):
    an output is a *classification* output if the model's last layer on that
    output has a ``softmax``/``sigmoid`` activation (a `Dense`/`Conv`
    ``activation=``, an `Activation` layer or a `Softmax` layer), or if the
    compiled loss of that output is a cross-entropy/KL loss (``binary_*``
    means sigmoid, ``categorical_*``/``sparse_categorical_*``/KLD softmax);
    otherwise it is a *regression* output. For classification, each model's
    output is taken as **probabilities** if its last activation is
    softmax/sigmoid, or if its compiled cross-entropy has
    ``from_logits=False``; otherwise as **logits** (e.g. a linear last layer,
    or ``from_logits=True``). Logits are recovered exactly from
    softmax/sigmoid layers where Keras caches them on the tensor (tf_keras,
    and Keras 3 on TensorFlow and torch); other probabilities (Keras 3 on
    JAX) are converted with ``log(clip(p, 1e-7, 1))``. The decision is logged at INFO
    level.

    History keys: those of `fit` (``loss`` = the compiled hard-label loss
    plus regularisation, the compiled metrics, ``val_*``), plus
    ``distillation_loss`` (and ``<output>_distillation_loss`` per output of a
    multi-output model) and their ``val_`` versions. Validation evaluates the
    student (``val_loss`` equals what ``model.evaluate`` returns), so
    ``monitor="val_loss"`` selects on the task loss.

    **BatchNormalization recalibration** (``recalibrate_bn=True``): before
    fine-tuning, ``recalibrate_batchnorm(model, x, steps=recalibration_steps)``
    re-estimates the moving statistics of every BatchNormalization layer
    (nested ones too) on the training data (the training part only when
    ``validation_split`` is set), without changing any other weight (to recalibrate
    without fine-tuning, call `recalibrate_batchnorm` directly). Python generators cannot be read twice,
    so they are refused here; call `recalibrate_batchnorm` yourself with
    re-readable data first.

    On Keras 3, distillation is installed as the student's ``compute_loss``
    and ``compute_metrics`` for the duration of the call (the hooks every
    backend's ``train_step`` uses); the reported ``loss`` is still the hard
    loss (its value) while the gradient is the distillation objective's.

    **Distribution.** Works when ``model`` (and ``teacher``) were created and
    compiled under a `tf.distribute` strategy scope, e.g.
    ``tf.distribute.MirroredStrategy()``: training runs on every replica and
    losses are scaled per replica like Keras does. For multi-worker training
    with ``tf.distribute.MultiWorkerMirroredStrategy``: set ``TF_CONFIG`` on
    every worker (``{"cluster": {"worker": ["host1:port", "host2:port"]},
    "task": {"type": "worker", "index": i}}``), create the strategy at program
    start, build **and compile** the student and build the teacher (load its
    weights) inside ``strategy.scope()``, then call ``recover(model, dataset,
    epochs=...)`` as usual on every worker with a `tf.data.Dataset` batched
    with the *global* batch size (it is sharded across workers
    automatically); save only from the chief (``task index 0``).

    Args:
        model: The compiled `keras.Model` to fine-tune (the student).
        x: Input data, as for `fit`.
        y: Targets, as for `fit`.
        teacher: Optional `keras.Model` to distil from, with the same inputs
            and the same number and shapes of outputs as ``model``. Need not
            be compiled (its compiled loss, if any, helps decide logits vs
            probabilities).
        distillation_weight: ``a`` in ``[0, 1]``, the weight of the
            distillation term (the hard loss gets ``1 - a``). Default 0.5.
            Ignored without a teacher.
        temperature: Positive softening temperature ``T`` for classification
            outputs. Default 4.
        recalibrate_bn: Whether to recalibrate BatchNormalization statistics
            on ``x`` before fine-tuning.
        recalibration_steps: Batches used by the recalibration (of
            ``batch_size`` samples, default 32, for array inputs).
        **fit_kwargs: Passed to ``model.fit`` unchanged.

    Returns:
        The `keras.callbacks.History` of the fine-tuning; ``history.model`` is
        ``model``.

    Raises:
        NotAModelError: If ``model`` or ``teacher`` is not a `keras.Model`.
        InvalidArgumentError: If ``model`` is not compiled, ``teacher`` is
            ``model``, ``distillation_weight`` is outside ``[0, 1]``,
            ``temperature`` is not positive and finite, ``recalibration_steps``
            is not positive, the teacher's outputs do not match the student's
            in number or shape, or ``recalibrate_bn=True`` with a generator.
        InvalidArgumentTypeError: If a numeric argument is not a number.
        MixedFlavoursError: If ``model`` and ``teacher`` come from different
            Keras flavours (tf_keras and Keras 3).

    Example:
        >>> import keras_rebuild as kr
        >>> from keras_rebuild.recover import recover
        >>> (x, y), (xt, yt) = kr.load_digits()
        >>> teacher = kr.digits_cnn(width=16, flavour="keras3")
        >>> student = kr.digits_cnn(width=8, flavour="keras3")
        >>> student.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        >>> history = recover(student, x, y, teacher=teacher, epochs=1,
        ...                   validation_data=(xt, yt), verbose=0)
        >>> sorted(history.history)
        ['accuracy', 'distillation_loss', 'loss', 'val_accuracy', 'val_distillation_loss', 'val_loss']
        >>> history.model is student
        True
    """
    keras_of(model, "model")
    if teacher is not None:
        keras_of(teacher, "teacher")
        if teacher is model:
            raise InvalidArgumentError(
                "Expected `teacher` to be a different model from the student. "
                f"Received: teacher={teacher.name!r} (the student itself)"
            )
        same_flavour(model=model, teacher=teacher)
    weight = check_weight(distillation_weight)
    temperature = check_temperature(temperature)
    recalibration_steps = check_steps(recalibration_steps, "recalibration_steps")
    if not isinstance(recalibrate_bn, bool):
        raise InvalidArgumentTypeError(
            f"Expected `recalibrate_bn` to be a bool. Received: {received('recalibrate_bn', recalibrate_bn)}"
        )
    check_compiled(model)
    impl = _implementation(model)

    if recalibrate_bn:
        if x is None or impl.is_generator(x):
            raise InvalidArgumentError(
                "Expected `x` to be re-readable data (arrays, a `tf.data.Dataset` or a "
                "`keras.utils.Sequence`) when `recalibrate_bn=True`, since it is read "
                "once for recalibration and again for training; call "
                "`recalibrate_batchnorm(model, data)` first instead. "
                f"Received: x of type {type(x).__name__}"
            )
        impl.recalibrate_batchnorm(
            model,
            impl.training_part(x, fit_kwargs.get("validation_split")),
            recalibration_steps,
            fit_kwargs.get("batch_size") or 32,
            0,
        )
    return impl.fit(model, x, y, teacher, weight, temperature, fit_kwargs)
