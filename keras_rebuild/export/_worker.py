"""Subprocess entry point: load a ``.keras`` file under this process's Keras backend and convert it.

Run as ``python -m keras_rebuild.export._worker JOB.json`` with
``KERAS_BACKEND`` set; used by :func:`keras_rebuild.export.convert.convert_in_subprocess`
for Keras 3 models on the JAX backend (and the converter's options on torch).
"""
import json
import sys


def main(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    try:
        import keras
        import numpy as np

        from keras_rebuild.export import _input_specs
        from keras_rebuild.export import convert

        model = keras.saving.load_model(job["model"], compile=False)
        specs = _input_specs(model)
        calibration = None
        if job.get("calibration"):
            data = np.load(job["calibration"])
            arrays = [data[f"input_{i}"] for i in range(len(specs))]
            calibration = [[a[j:j + 1] for a in arrays] for j in range(arrays[0].shape[0])]
        shapes = job.get("shapes")
        if keras.backend.backend() == "torch":
            content = convert.convert_keras3_torch(model, specs, shapes)
        else:
            content = convert.convert_keras3_tensorflow(model, job["quantize"], job["int8_io"], calibration, specs,
                                                        shapes, bool(job.get("select_tf_ops")))
        with open(job["out"], "wb") as f:
            f.write(content)
    except Exception as exc:  # reported to the parent process as our error
        with open(job["error"], "w") as f:
            json.dump({"type": type(exc).__name__, "message": str(exc)}, f)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
