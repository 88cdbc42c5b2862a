"""The code of the MLflow Model a prior run logs ("models from code": MLflow runs this file to
build the model, so nothing is unpickled; the weights load weights-only in load_context).

The logic lives in pipeline/served.py, which MLflow ships with the model (code_paths)."""

import warnings

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

# MLflow suggests type hints on predict when the class is defined; this model has a signature
# of its own (pipeline/served.py), so the advice does not apply
warnings.filterwarnings("ignore", message=".*Add type hints", category=UserWarning)


class GeneratorModel(PythonModel):
    """predict(table of requests) -> table of images (PNG, base64) and their token grids."""

    def load_context(self, context):
        from pipeline.served import ServedGenerator
        self.generator = ServedGenerator.load(context.artifacts["prior"],
                                              context.artifacts["tokenizer"])

    def predict(self, context, model_input, params=None):
        return self.generator.predict(model_input)


set_model(GeneratorModel())
