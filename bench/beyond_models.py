"""Small keras-io-style models beyond plain CNNs, written with plain Keras layers.

Shared by ``tests/test_beyond_zoo.py`` and ``bench/bench_beyond.py``. Every
builder takes the Keras module of the flavour under test (``keras`` or
``tf_keras``) and builds with random initial weights (``weights=None``), at
input sizes small enough for tests:

* :func:`vae_decoder` - keras-io's VAE decoder: ``Dense(7*7*64)`` unflattened
  by ``Reshape((7, 7, 64))``, then a ``Conv2DTranspose`` stack;
* :func:`cyclegan_generator` / :func:`patchgan_discriminator` - keras-io's
  CycleGAN ResNet generator and PatchGAN discriminator with instance norm
  (``GroupNormalization(groups=-1)``) and residual blocks (zero padding
  instead of the example's custom reflection padding layer);
* :func:`inception_resnet_v2` - ``keras.applications.InceptionResNetV2`` at 75x75;
* :func:`text_classifier` - ``Embedding -> Bidirectional(LSTM) -> GRU -> Dense``;
* :func:`vit` - keras-io's ViT: patches by a ``Conv2D`` with stride = patch
  size, ``Reshape`` to ``(patches, dim)``, a learned position ``Embedding``
  (of a second, integer input holding the patch positions), transformer blocks
  (LayerNormalization, MultiHeadAttention, Dense-gelu-Dense MLP, residual adds);
* :func:`vit_keras_io` - the same at keras-io's own size;
* :func:`mobilevit` - keras-io's MobileViT (XXS): inverted residual blocks and
  MobileViT blocks (local convs, unfolding ``Reshape``, transformer blocks,
  folding ``Reshape``, fusion by ``Concatenate``), at 64x64;
* :func:`rnn_stack`, :func:`groupnorm_cnn`, :func:`attention_block` - one
  family each, whose size argument (units, groups, heads) the acceptance tests
  halve.
"""
from __future__ import annotations


def vae_decoder(keras, latent_dim: int = 2):
    L = keras.layers
    inp = keras.Input((latent_dim,), name="z")
    x = L.Dense(7 * 7 * 64, activation="relu", name="dense")(inp)
    x = L.Reshape((7, 7, 64), name="unflatten")(x)
    x = L.Conv2DTranspose(64, 3, activation="relu", strides=2, padding="same", name="deconv1")(x)
    x = L.Conv2DTranspose(32, 3, activation="relu", strides=2, padding="same", name="deconv2")(x)
    out = L.Conv2DTranspose(1, 3, activation="sigmoid", padding="same", name="decoded")(x)
    return keras.Model(inp, out, name="vae_decoder")


def _instance_norm(keras, name):
    return keras.layers.GroupNormalization(
        groups=-1, gamma_initializer=keras.initializers.RandomNormal(1.0, 0.02, seed=0), name=name)


def cyclegan_generator(keras, filters: int = 8, downsamples: int = 2, residual_blocks: int = 3,
                       size: int = 32):
    """keras-io's ``get_resnet_generator``: c7s1-f, d2f, d4f, residual blocks, u2f, uf, c7s1-3."""
    L = keras.layers
    init = keras.initializers.RandomNormal(0.0, 0.02, seed=1)
    inp = keras.Input((size, size, 3), name="image")
    x = L.Conv2D(filters, 7, padding="same", kernel_initializer=init, use_bias=False, name="stem")(inp)
    x = _instance_norm(keras, "stem_norm")(x)
    x = L.Activation("relu", name="stem_relu")(x)
    for i in range(downsamples):
        filters *= 2
        x = L.Conv2D(filters, 3, strides=2, padding="same", kernel_initializer=init, use_bias=False,
                     name=f"down{i}")(x)
        x = _instance_norm(keras, f"down{i}_norm")(x)
        x = L.Activation("relu", name=f"down{i}_relu")(x)
    for i in range(residual_blocks):
        shortcut = x
        y = L.Conv2D(filters, 3, padding="same", kernel_initializer=init, use_bias=False, name=f"res{i}_conv1")(x)
        y = _instance_norm(keras, f"res{i}_norm1")(y)
        y = L.Activation("relu", name=f"res{i}_relu")(y)
        y = L.Conv2D(filters, 3, padding="same", kernel_initializer=init, use_bias=False, name=f"res{i}_conv2")(y)
        y = _instance_norm(keras, f"res{i}_norm2")(y)
        x = L.Add(name=f"res{i}_add")([shortcut, y])
    for i in range(downsamples):
        filters //= 2
        x = L.Conv2DTranspose(filters, 3, strides=2, padding="same", kernel_initializer=init, use_bias=False,
                              name=f"up{i}")(x)
        x = _instance_norm(keras, f"up{i}_norm")(x)
        x = L.Activation("relu", name=f"up{i}_relu")(x)
    x = L.Conv2D(3, 7, padding="same", name="to_rgb")(x)
    out = L.Activation("tanh", name="tanh")(x)
    return keras.Model(inp, out, name="cyclegan_generator")


def patchgan_discriminator(keras, filters: int = 8, downsamples: int = 3, size: int = 32):
    """keras-io's ``get_discriminator``: C64 (no norm), C128-C256-C512 with instance norm, 1-channel patch map."""
    L = keras.layers
    init = keras.initializers.RandomNormal(0.0, 0.02, seed=2)
    inp = keras.Input((size, size, 3), name="image")
    x = L.Conv2D(filters, 4, strides=2, padding="same", kernel_initializer=init, name="c0")(inp)
    x = L.LeakyReLU(0.2, name="c0_lrelu")(x)
    for i in range(1, downsamples + 1):
        filters *= 2
        strides = 2 if i < downsamples else 1
        x = L.Conv2D(filters, 4, strides=strides, padding="same", kernel_initializer=init, use_bias=False,
                     name=f"c{i}")(x)
        x = _instance_norm(keras, f"c{i}_norm")(x)
        x = L.LeakyReLU(0.2, name=f"c{i}_lrelu")(x)
    out = L.Conv2D(1, 4, padding="same", kernel_initializer=init, name="patches")(x)
    return keras.Model(inp, out, name="patchgan_discriminator")


def inception_resnet_v2(keras, size: int = 75, classes: int = 1000):
    return keras.applications.InceptionResNetV2(weights=None, input_shape=(size, size, 3), classes=classes)


def text_classifier(keras, vocab: int = 64, length: int = 12, dim: int = 16, units: int = 16):
    """keras-io's bidirectional LSTM text classifier, with a GRU on top."""
    L = keras.layers
    inp = keras.Input((length,), dtype="int32", name="tokens")
    x = L.Embedding(vocab, dim, name="embedding")(inp)
    x = L.Bidirectional(L.LSTM(units, return_sequences=True), name="bilstm")(x)
    x = L.GRU(units, name="gru")(x)
    x = L.Dense(units, activation="relu", name="hidden")(x)
    out = L.Dense(1, activation="sigmoid", name="score")(x)
    return keras.Model(inp, out, name="text_classifier")


def _transformer_block(keras, x, dim, heads, key_dim, mlp_units, name):
    L = keras.layers
    y = L.LayerNormalization(epsilon=1e-6, name=f"{name}_ln1")(x)
    y = L.MultiHeadAttention(num_heads=heads, key_dim=key_dim, dropout=0.1, name=f"{name}_mha")(y, y)
    x = L.Add(name=f"{name}_add1")([y, x])
    y = L.LayerNormalization(epsilon=1e-6, name=f"{name}_ln2")(x)
    y = L.Dense(mlp_units, activation="gelu", name=f"{name}_mlp1")(y)
    y = L.Dropout(0.1, name=f"{name}_drop")(y)
    y = L.Dense(dim, name=f"{name}_mlp2")(y)
    return L.Add(name=f"{name}_add2")([y, x])


def vit(keras, size: int = 32, patch: int = 8, dim: int = 32, heads: int = 4, key_dim: int = 8,
        blocks: int = 2, head_units=(32, 16), classes: int = 10):
    """keras-io's ``create_vit_classifier``, small."""
    L = keras.layers
    patches = (size // patch) ** 2
    image = keras.Input((size, size, 3), name="image")
    positions = keras.Input((patches,), dtype="int32", name="positions")
    x = L.Conv2D(dim, patch, strides=patch, name="patch_projection")(image)
    x = L.Reshape((patches, dim), name="patches")(x)
    pos = L.Embedding(patches, dim, name="position_embedding")(positions)
    x = L.Add(name="encoded_patches")([x, pos])
    for i in range(blocks):
        x = _transformer_block(keras, x, dim, heads, key_dim, 2 * dim, f"block{i}")
    x = L.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dropout(0.5, name="head_drop")(x)
    for i, units in enumerate(head_units):
        x = L.Dense(units, activation="gelu", name=f"head{i}")(x)
        x = L.Dropout(0.5, name=f"head{i}_drop")(x)
    out = L.Dense(classes, name="logits")(x)
    return keras.Model([image, positions], out, name="vit")


def vit_keras_io(keras):
    """keras-io's ViT at its own size: 72 px, patch 6, dim 64, 8 blocks of 4 heads (key_dim 64), head 2048/1024."""
    return vit(keras, size=72, patch=6, dim=64, heads=4, key_dim=64, blocks=8, head_units=(2048, 1024),
               classes=100)


def mobilevit(keras, size: int = 64, classes: int = 5, expansion: int = 2, patch: int = 4):
    """keras-io's ``create_mobilevit`` (image classification with MobileViT), at ``size`` x ``size``."""
    L = keras.layers
    count = [0]

    def name(kind):
        count[0] += 1
        return f"{kind}_{count[0]}"

    def conv_block(x, filters=16, kernel_size=3, strides=2):
        return L.Conv2D(filters, kernel_size, strides=strides, activation="swish", padding="same",
                        name=name("conv"))(x)

    def inverted_residual(x, expanded, out, strides=1):
        m = L.Conv2D(expanded, 1, padding="same", use_bias=False, name=name("expand"))(x)
        m = L.Activation("swish")(L.BatchNormalization(name=name("expand_bn"))(m))
        if strides == 2:
            m = L.ZeroPadding2D(((0, 1), (0, 1)))(m)
        m = L.DepthwiseConv2D(3, strides=strides, padding="same" if strides == 1 else "valid", use_bias=False,
                              name=name("depthwise"))(m)
        m = L.Activation("swish")(L.BatchNormalization(name=name("depthwise_bn"))(m))
        m = L.Conv2D(out, 1, padding="same", use_bias=False, name=name("project"))(m)
        m = L.BatchNormalization(name=name("project_bn"))(m)
        if int(x.shape[-1]) == out and strides == 1:
            return L.Add()([m, x])
        return m

    def transformer(x, layers, dim, heads=2):
        for _ in range(layers):
            x1 = L.LayerNormalization(epsilon=1e-6, name=name("ln"))(x)
            a = L.MultiHeadAttention(heads, key_dim=dim, dropout=0.1, name=name("mha"))(x1, x1)
            x2 = L.Add()([a, x])
            x3 = L.LayerNormalization(epsilon=1e-6, name=name("ln"))(x2)
            for units in (2 * int(x.shape[-1]), int(x.shape[-1])):
                x3 = L.Dropout(0.1)(L.Dense(units, activation="swish", name=name("mlp"))(x3))
            x = L.Add()([x3, x2])
        return x

    def mobilevit_block(x, layers, dim):
        local = conv_block(x, filters=dim, strides=1)
        local = conv_block(local, filters=dim, kernel_size=1, strides=1)
        h, w = int(local.shape[1]), int(local.shape[2])
        unfolded = L.Reshape((patch, h * w // patch, dim))(local)
        folded = L.Reshape((h, w, dim))(transformer(unfolded, layers, dim))
        folded = conv_block(folded, filters=int(x.shape[-1]), kernel_size=1, strides=1)
        return conv_block(L.Concatenate(axis=-1)([x, folded]), filters=dim, strides=1)

    inputs = keras.Input((size, size, 3))
    x = L.Rescaling(1.0 / 255)(inputs)
    x = conv_block(x, filters=16)
    x = inverted_residual(x, 16 * expansion, 16)
    x = inverted_residual(x, 16 * expansion, 24, strides=2)
    x = inverted_residual(x, 24 * expansion, 24)
    x = inverted_residual(x, 24 * expansion, 24)
    x = inverted_residual(x, 24 * expansion, 48, strides=2)
    x = mobilevit_block(x, 2, 64)
    x = inverted_residual(x, 64 * expansion, 64, strides=2)
    x = mobilevit_block(x, 4, 80)
    x = inverted_residual(x, 80 * expansion, 80, strides=2)
    x = mobilevit_block(x, 3, 96)
    x = conv_block(x, filters=320, kernel_size=1, strides=1)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(classes, activation="softmax", name="predictions")(x), name="mobilevit")


def vit_inputs(model, batch: int = 4, seed: int = 0):
    """Random images and the patch positions ``0 .. patches-1`` (what keras-io's PatchEncoder feeds)."""
    import numpy as np

    image, positions = model.inputs
    rng = np.random.default_rng(seed)
    shape = (batch,) + tuple(int(d) for d in image.shape[1:])
    n = int(positions.shape[1])
    return [rng.normal(size=shape).astype("float32"), np.tile(np.arange(n, dtype="int32"), (batch, 1))]


# --------------------------------------------------------------------------- one family each
def rnn_stack(keras, units: int = 8):
    """``Bidirectional(LSTM(units))`` -> ``GRU(units)`` -> ``SimpleRNN(units)`` -> Dense, on (6, 5) inputs."""
    L = keras.layers
    inp = keras.Input((6, 5), name="sequence")
    x = L.Bidirectional(L.LSTM(units, return_sequences=True), name="bilstm")(inp)
    x = L.GRU(units, return_sequences=True, name="gru")(x)
    x = L.SimpleRNN(units, name="rnn")(x)
    out = L.Dense(3, name="head")(x)
    return keras.Model(inp, out, name=f"rnn_stack_{units}")


def groupnorm_cnn(keras, groups: int = 8, group_size: int = 4):
    """Two Conv2D + GroupNormalization(groups) + ReLU stages of ``groups * group_size`` channels."""
    L = keras.layers
    channels = groups * group_size
    inp = keras.Input((8, 8, 3), name="image")
    x = inp
    for i in range(2):
        x = L.Conv2D(channels, 3, padding="same", name=f"conv{i}")(x)
        x = L.GroupNormalization(groups=groups, name=f"gn{i}")(x)
        x = L.Activation("relu", name=f"relu{i}")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    out = L.Dense(3, name="head")(x)
    return keras.Model(inp, out, name=f"groupnorm_cnn_{groups}")


def attention_block(keras, heads: int = 4, key_dim: int = 8, length: int = 6, dim: int = 16):
    """Dense -> MultiHeadAttention(heads, key_dim) self-attention -> Dense, on (length, dim) inputs."""
    L = keras.layers
    inp = keras.Input((length, dim), name="sequence")
    x = L.Dense(dim, name="embed")(inp)
    x = L.MultiHeadAttention(num_heads=heads, key_dim=key_dim, name="mha")(x, x)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    out = L.Dense(3, name="head")(x)
    return keras.Model(inp, out, name=f"attention_block_{heads}")
