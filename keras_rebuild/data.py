"""Small bundled datasets and model builders for demos, tests and tutorials.

Nothing here downloads anything: the digits data ships with scikit-learn
(1,797 real 8x8 handwritten digits).
"""
from __future__ import annotations

import numpy as np



def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """Load scikit-learn's bundled handwritten digits as image tensors.

    Args:
        test_fraction: Fraction of the samples held out for testing.
        seed: Seed of the shuffle that splits train and test.

    Returns:
        ``((x_train, y_train), (x_test, y_test))`` with ``x`` of shape
        ``(n, 8, 8, 1)``, float32 in ``[0, 1]``, and integer labels ``y``.

    Example:
        >>> (x, y), (xt, yt) = load_digits()
        >>> x.shape[1:]
        (8, 8, 1)
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "load_digits needs scikit-learn: pip install 'keras-rebuild[demo]'"
        ) from exc
    data = _sk_load_digits()
    x = (data.images.astype("float32") / 16.0)[..., None]
    y = data.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(round(len(x) * test_fraction))
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def _keras(flavour):
    if flavour == "keras3":
        import keras

        return keras
    if flavour == "tf_keras":
        from keras_rebuild._compat import keras

        return keras
    from keras_rebuild.errors import InvalidArgumentError, received

    raise InvalidArgumentError(
        f"Expected `flavour` to be 'keras3' or 'tf_keras'. Received: {received('flavour', flavour)}")


def digits_cnn(width: int = 32, num_classes: int = 10, seed: int = 0, flavour: str = "tf_keras") -> "keras.Model":
    """A small functional CNN for 8x8x1 digits: conv-BN-ReLU blocks and a Dense head.

    Args:
        width: Channels of the first block; later blocks use ``2 * width``.
        num_classes: Output classes (softmax probabilities).
        seed: Seed of the weight initialisers.
        flavour: ``"tf_keras"`` (Keras 2, for tfmot) or ``"keras3"`` (``import keras``, any backend).

    Returns:
        An uncompiled ``keras.Model`` of that flavour.
    """
    keras = _keras(flavour)
    init = lambda i: keras.initializers.GlorotUniform(seed=seed + i)  # noqa: E731
    inp = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer=init(0), name="conv1")(inp)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer=init(1), name="conv2")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(2 * width, 3, padding="same", use_bias=False, kernel_initializer=init(2), name="conv3")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn3")(x)
    x = keras.layers.ReLU(name="relu3")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(2 * width, activation="relu", kernel_initializer=init(3), name="fc1")(x)
    x = keras.layers.Dropout(0.2, name="drop")(x)
    out = keras.layers.Dense(num_classes, activation="softmax", kernel_initializer=init(4), name="probs")(x)
    return keras.Model(inp, out, name="digits_cnn")
