"""The code of the classifier's MLflow Model, logged by `probe --finetune` ("models from code":
MLflow runs this file to build the model, so nothing is unpickled; the weights load
weights-only in load_context).

The logic lives in pipeline/classify.py, which MLflow ships with the model (code_paths)."""

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class ClassifierModel(PythonModel):
    """predict(table with a column image_png_base64) -> a probability column per class, and
    `label`."""

    def load_context(self, context):
        from pipeline.classify import Classifier
        self.classifier = Classifier.load(context.artifacts["prior"],
                                          context.artifacts["classifier"],
                                          context.artifacts["tokenizer"])

    # with a DataFrame hint MLflow neither validates the input nor warns that hints are missing;
    # predict checks its one column itself
    def predict(self, context, model_input: pd.DataFrame, params=None):
        return self.classifier.predict(model_input)


set_model(ClassifierModel())
