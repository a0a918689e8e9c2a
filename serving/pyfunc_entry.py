"""Models-from-code entry of the image pyfunc: MLflow runs this file when logging and loading the model."""
import mlflow

from serving.pyfunc_model import ImageEnsembleModel

mlflow.models.set_model(ImageEnsembleModel())
