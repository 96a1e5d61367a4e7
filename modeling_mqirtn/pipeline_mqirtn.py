"""`ComposedImageRetrievalPipeline`: the `"composed-image-retrieval"` task for MQIRTN models.

Hub code: imports only torch, transformers, numpy and PIL, so that a saved model folder (see `save_for_hub`) loads the
pipeline in a process where this package is not installed:

```python
>>> from transformers import pipeline
>>> pipe = pipeline("composed-image-retrieval", model="org/mqirtn", trust_remote_code=True)  # doctest: +SKIP
>>> pipe(image="dress.jpg", text="make it red", gallery=index, top_k=5)  # doctest: +SKIP
[{'score': 0.91, 'index': 17, 'id': 'red_dress.jpg'}, ...]
```
"""

import os
from pathlib import Path

import numpy as np
import torch
from transformers import Pipeline
from transformers.utils import logging

from .search_mqirtn import exact_search


logger = logging.get_logger(__name__)


TASK = "composed-image-retrieval"
# The model card's `pipeline_tag`, a task the Hub knows: gallery embeddings of images (`get_image_features`).
IMAGE_FEATURES_TASK = "image-feature-extraction"
# What `config.json` needs so that `pipeline(task, model=folder, trust_remote_code=True)` finds these classes.
CUSTOM_PIPELINES = {
    TASK: {"impl": "pipeline_mqirtn.ComposedImageRetrievalPipeline", "pt": ["AutoModel"], "type": "multimodal"},
    IMAGE_FEATURES_TASK: {
        "impl": "pipeline_mqirtn.MQIRTNImageFeatureExtractionPipeline",
        "pt": ["AutoModel"],
        "type": "image",
    },
}


class _MQIRTNPipeline(Pipeline):
    """What both MQIRTN pipelines share: they read images and texts through the MQIRTN processor (never a separate
    tokenizer or image processor) and run the model in eval mode."""

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(
                f"{type(self).__name__} needs a `processor` (an MQIRTNProcessor): pass `processor=` or load from a "
                "folder saved with `save_for_hub`, which holds the processor"
            )
        self.model.eval()


class ComposedImageRetrievalPipeline(_MQIRTNPipeline):
    r"""
    Composed image retrieval: a query is a reference image plus a modification text; the answer is the gallery images
    ranked by cosine similarity between the composed query embedding and their gallery embeddings.

    Call forms:

    - `pipe(image=ref, text="make it red", gallery=index, top_k=5)` -> `[{"score": float, "index": int, "id": str}, ...]`
      best first;
    - `pipe([{"image": ..., "text": ...}, ...], gallery=index, batch_size=16)` -> one such list per query;
    - without `gallery` -> the L2-normalised query embedding: a list of `projection_dim` floats (as transformers'
      feature-extraction pipelines return), or with `return_tensors=True` a `torch.FloatTensor` of shape
      `(projection_dim,)`;
    - `pipe.embed_gallery(images)` -> the gallery embeddings of a list of images, to pass as `gallery=`.

    Images may be PIL images, numpy arrays, local paths or URLs. `gallery` is either an index object with
    `search(query_embeds, top_k) -> (scores, indices)` and `ids` (such as `GalleryIndex`; if it has
    `check_model(model)` that is called first, so an index built with another model is refused), or a
    `torch.Tensor`/`numpy.ndarray` of L2-normalised gallery embeddings of shape `(gallery_size, projection_dim)`
    (ids are then the row numbers as strings).

    Example (a tiny random model; a trained one is loaded with `pipeline("composed-image-retrieval",
    model="org/mqirtn", trust_remote_code=True)`):

    ```python
    >>> import os, tempfile
    >>> from PIL import Image
    >>> from transformers import BertConfig, BertTokenizer, ViTConfig, ViTImageProcessorPil, pipeline
    >>> from modeling_mqirtn import MQIRTNConfig, MQIRTNModel  # importing it registers the task
    >>> from processing import MQIRTNProcessor

    >>> vocab = os.path.join(tempfile.mkdtemp(), "vocab.txt")
    >>> _ = open(vocab, "w").write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "make", "it", "red"]))
    >>> processor = MQIRTNProcessor(ViTImageProcessorPil(size={"height": 32, "width": 32}), BertTokenizer(vocab))
    >>> vision = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    >>> text = BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    >>> model = MQIRTNModel(MQIRTNConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=32, fusion_num_heads=4))
    >>> pipe = pipeline("composed-image-retrieval", model=model, processor=processor)

    >>> gallery_images = [Image.new("RGB", (40, 40), color) for color in ("red", "green", "blue")]
    >>> gallery = pipe.embed_gallery(gallery_images)  # (3, projection_dim), L2-normalised
    >>> gallery.shape
    torch.Size([3, 32])
    >>> hits = pipe(image=gallery_images[1], text="make it red", gallery=gallery, top_k=2)
    >>> len(hits), sorted(hits[0])
    (2, ['id', 'index', 'score'])
    ```
    """

    def __call__(self, inputs=None, *, image=None, text=None, **kwargs):
        r"""
        inputs (`dict` or `list[dict]`, *optional*): `{"image": ..., "text": ...}` queries; or use `image=`/`text=`.
        image (image or list of images, *optional*): reference image(s).
        text (`str` or `list[str]`, *optional*): modification text(s).
        gallery (index object, tensor or array, *optional*): what to search; without it the query embedding is returned.
        return_tensors (`bool`, *optional*, defaults to `False`): without `gallery`, return the embedding as a tensor
            instead of a list of floats.
        top_k (`int`, *optional*, defaults to 10): number of results per query.
        filter (`str`, *optional*): with an index `gallery`, only rows whose metadata satisfy it, e.g.
            `'folder == "shoes"'` (passed to `gallery.search(..., filter=...)`).
        batch_size (`int`, *optional*): queries per forward pass for list inputs.
        """
        if inputs is None:
            if image is None or text is None:
                raise ValueError(
                    "Give `image=` and `text=` (or a list of {'image': ..., 'text': ...} dicts as `inputs`)"
                )
            if isinstance(image, (list, tuple)) or isinstance(text, (list, tuple)):
                if not (isinstance(image, (list, tuple)) and isinstance(text, (list, tuple))):
                    raise ValueError("`image` and `text` must both be lists or both be single items")
                if len(image) != len(text):
                    raise ValueError(f"`image` and `text` must have the same length, got {len(image)} and {len(text)}")
                inputs = [{"image": i, "text": t} for i, t in zip(image, text)]
            else:
                inputs = {"image": image, "text": text}
        elif image is not None or text is not None:
            raise ValueError("Give either `inputs` or `image=`/`text=`, not both")
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if isinstance(inputs, list) and not inputs:
            raise ValueError("`inputs` is an empty list; give at least one query")
        return super().__call__(inputs, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """transformers' `Pipeline.save_pretrained` (model, code files, `custom_pipelines`) plus the processor, which
        it leaves out: the folder then loads with `pipeline("composed-image-retrieval", model=folder,
        trust_remote_code=True)` like one written by `save_for_hub`."""
        super().save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory, **kwargs)

    def embed_gallery(self, images, batch_size: int = 32) -> torch.Tensor:
        r"""
        Gallery embeddings of `images`, to pass as `gallery=` (the way to build a gallery without this package
        installed): the model's `get_image_features` on the processor's pixels, `batch_size` images per forward pass.

        images (`list` of images): PIL images, numpy arrays, local paths or URLs, read by the same decoder as queries.

        Returns `torch.FloatTensor` of shape `(len(images), projection_dim)` on the CPU, L2-normalised; row `i` is
        `images[i]`, so a result's `index` is the position of the image in `images`.

        Example (a pipeline loaded from a saved folder or a Hub repository with `trust_remote_code=True`):

        ```python
        >>> gallery = pipe.embed_gallery(["a.jpg", "b.jpg", "c.jpg"])  # doctest: +SKIP
        >>> pipe(image="query.jpg", text="make it red", gallery=gallery, top_k=2)  # doctest: +SKIP
        [{'score': 0.87, 'index': 2, 'id': '2'}, {'score': 0.55, 'index': 0, 'id': '0'}]
        ```
        """
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, (list, tuple)):
            raise TypeError(
                f"`images` must be a list of images (PIL, numpy, paths or URLs), got {type(images).__name__}"
            )
        if not images:
            raise ValueError("`images` is empty: a gallery needs at least one image")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        embeds = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = self.processor(images=list(images[start : start + batch_size]), return_tensors="pt")
                pixel_values = batch["pixel_values"].to(self.device, self.model.dtype)
                features = self.model.get_image_features(pixel_values=pixel_values).pooler_output
                embeds.append(features.float().cpu())
        return torch.cat(embeds)

    def _sanitize_parameters(self, gallery=None, top_k=None, return_tensors=None, filter=None, **unknown):
        if unknown:
            raise TypeError(f"ComposedImageRetrievalPipeline got unexpected arguments {sorted(unknown)}")
        forward_params, postprocess_params = {}, {}
        if return_tensors is not None:
            if not isinstance(return_tensors, bool):
                raise TypeError(f"`return_tensors` must be True or False, got {return_tensors!r}")
            if gallery is not None:
                raise ValueError(
                    "`return_tensors` applies to query embeddings (no `gallery`); search results are dicts"
                )
            postprocess_params["return_tensors"] = return_tensors
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}")
            forward_params["top_k"] = top_k
        if filter is not None:
            if not isinstance(filter, str):
                raise TypeError(f"`filter` must be a string expression such as 'folder == \"shoes\"', got {filter!r}")
            if gallery is None or isinstance(gallery, (torch.Tensor, np.ndarray)):
                raise ValueError("`filter` needs a `gallery` index whose rows carry metadata (e.g. GalleryIndex)")
            forward_params["filter"] = filter
        if gallery is not None:
            gallery = self._check_gallery(gallery)
            forward_params["gallery"] = gallery
            postprocess_params["gallery"] = gallery
        return {}, forward_params, postprocess_params

    def _check_gallery(self, gallery):
        """Validates `gallery` once per call; returns it with tensors/arrays as float tensors."""
        dim = self.model.config.projection_dim
        if isinstance(gallery, np.ndarray):
            gallery = torch.from_numpy(gallery)
        if isinstance(gallery, torch.Tensor):
            if gallery.dim() != 2 or gallery.shape[1] != dim:
                raise ValueError(
                    f"`gallery` as embeddings must have shape (gallery_size, {dim}) (the model's projection_dim), "
                    f"got {tuple(gallery.shape)}"
                )
            return gallery.float()
        if not callable(getattr(gallery, "search", None)) or not hasattr(gallery, "ids"):
            raise ValueError(
                "`gallery` must be an index with `search(query_embeds, top_k)` and `ids` (e.g. GalleryIndex) or a "
                f"(gallery_size, {dim}) tensor of embeddings, got {type(gallery).__name__}"
            )
        if callable(getattr(gallery, "check_model", None)):
            gallery.check_model(self.model)
        return gallery

    def preprocess(self, inputs):
        if not isinstance(inputs, dict) or set(inputs) != {"image", "text"}:
            described = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
            raise ValueError(f"each query must be a dict with keys 'image' and 'text', got {described}")
        if not isinstance(inputs["text"], str):
            raise ValueError(f"a query's 'text' must be a string, got {type(inputs['text']).__name__}")
        limit = self._text_limit()
        batch = self.processor(images=[inputs["image"]], text=[inputs["text"]], return_tensors="pt", max_length=limit)
        if limit is not None and batch["input_ids"].shape[1] >= limit:
            full = len(self.processor.tokenizer(inputs["text"], truncation=False)["input_ids"])
            if full > limit:
                logger.warning(
                    f"The modification text has {full} tokens, more than the model's {limit}: it was truncated to its "
                    f"first {limit} tokens"
                )
        return {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask")}

    def _text_limit(self) -> int | None:
        """The most tokens the text tower takes (its position embeddings, or the tokenizer's smaller cap)."""
        limits = [
            getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", None),
            getattr(self.processor.tokenizer, "model_max_length", None),
        ]
        limits = [limit for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
        return min(limits) if limits else None

    def _forward(self, model_inputs, gallery=None, top_k=10, filter=None):
        query_embeds = self.model.get_query_features(
            pixel_values=model_inputs["pixel_values"].to(self.model.dtype),
            input_ids=model_inputs["input_ids"],
            attention_mask=model_inputs["attention_mask"],
        ).pooler_output
        if gallery is None:
            return {"query_embeds": query_embeds}
        if isinstance(gallery, torch.Tensor):
            scores, indices = exact_search(query_embeds.float(), gallery, top_k)
        elif filter is not None:
            scores, indices = gallery.search(query_embeds, top_k, filter=filter)
        else:
            scores, indices = gallery.search(query_embeds, top_k)
        return {"scores": torch.as_tensor(scores), "indices": torch.as_tensor(indices)}

    def postprocess(self, model_outputs, gallery=None, return_tensors=False):
        if gallery is None:
            embedding = model_outputs["query_embeds"][0].float().cpu()
            return embedding if return_tensors else embedding.tolist()
        ids = None if isinstance(gallery, torch.Tensor) else gallery.ids
        scores = model_outputs["scores"][0].tolist()
        indices = model_outputs["indices"][0].tolist()
        return [
            {"score": float(score), "index": int(index), "id": str(index) if ids is None else str(ids[index])}
            for score, index in zip(scores, indices)
            if index >= 0  # FAISS marks missing results with -1
        ]


class MQIRTNImageFeatureExtractionPipeline(_MQIRTNPipeline):
    r"""
    The `"image-feature-extraction"` task (the model card's `pipeline_tag`) for an MQIRTN folder: the gallery embedding
    of each image, `get_image_features(...).pooler_output`, L2-normalised, read through the MQIRTN processor (the same
    pixels as the index and the composed-retrieval pipeline). A saved folder's `config.json` names this class for the
    task, so `pipeline("image-feature-extraction", model=folder, trust_remote_code=True)` builds it; transformers'
    own pipeline for the task would call `model(pixel_values=...)`, and MQIRTN's forward needs a text too.

    - `pipe(image)` -> `[[float] * projection_dim]` (one row, as transformers' pipeline returns pooled features);
    - `pipe([image, ...], batch_size=8)` -> one such list per image;
    - `return_tensors=True` -> a `torch.FloatTensor` of shape `(1, projection_dim)` instead;
    - `pool=False` -> the vision tower's token states `(1, 1 + num_patches, vision_hidden_size)` (`last_hidden_state`)
      instead of the embedding.

    Images may be PIL images, numpy arrays, local paths or URLs.

    ```python
    >>> from transformers import pipeline
    >>> pipe = pipeline("image-feature-extraction", model="org/mqirtn", trust_remote_code=True)  # doctest: +SKIP
    >>> embedding = pipe("dress.jpg", return_tensors=True)  # (1, projection_dim), L2-normalised  # doctest: +SKIP
    ```
    """

    def _sanitize_parameters(self, return_tensors=None, pool=None, **unknown):
        if unknown:
            raise TypeError(f"MQIRTNImageFeatureExtractionPipeline got unexpected arguments {sorted(unknown)}")
        postprocess_params, forward_params = {}, {}
        if return_tensors is not None:
            if not isinstance(return_tensors, bool):
                raise TypeError(f"`return_tensors` must be True or False, got {return_tensors!r}")
            postprocess_params["return_tensors"] = return_tensors
        if pool is not None:
            if not isinstance(pool, bool):
                raise TypeError(f"`pool` must be True or False, got {pool!r}")
            forward_params["pool"] = pool
        return {}, forward_params, postprocess_params

    def preprocess(self, image):
        return {"pixel_values": self.processor(images=[image], return_tensors="pt")["pixel_values"]}

    def _forward(self, model_inputs, pool=True):
        features = self.model.get_image_features(
            pixel_values=model_inputs["pixel_values"].to(self.model.dtype), return_dict=True
        )
        return {"features": features.pooler_output if pool else features.last_hidden_state}

    def postprocess(self, model_outputs, return_tensors=False):
        features = model_outputs["features"].float().cpu()
        return features if return_tensors else features.tolist()


def save_for_hub(model, processor, folder: str | os.PathLike) -> Path:
    r"""
    Saves `model` and `processor` into `folder`: the same as `model.save_pretrained(folder)` followed by
    `processor.save_pretrained(folder)` (the model's `save_pretrained` writes `custom_pipelines` into `config.json` and
    copies this file with the model's code). In a fresh process where this package is not installed,
    `pipeline("composed-image-retrieval", model=folder, trust_remote_code=True)`, `AutoModel.from_pretrained(folder,
    trust_remote_code=True)` and `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` then all work.

    Returns the folder as a `Path`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


__all__ = [
    "ComposedImageRetrievalPipeline",
    "IMAGE_FEATURES_TASK",
    "MQIRTNImageFeatureExtractionPipeline",
    "save_for_hub",
    "TASK",
]
