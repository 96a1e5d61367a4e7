"""`exact_search`: the one top-k search of this package, used by the pipeline, the gallery index and the evaluation
metrics, and `check_embedding_pair`, the shape check of every search and metric.

Hub code: imports only torch.
"""

import torch


def check_embedding_pair(query_embeds: torch.Tensor, gallery_embeds: torch.Tensor) -> None:
    """`ValueError` unless both are 2-D `(count, dim)` with the same `dim` (the check of every search and metric)."""
    if query_embeds.dim() != 2 or gallery_embeds.dim() != 2:
        raise ValueError(
            f"`query_embeds` and `gallery_embeds` must be 2-D (count, dim), got {tuple(query_embeds.shape)} and "
            f"{tuple(gallery_embeds.shape)}"
        )
    if query_embeds.shape[1] != gallery_embeds.shape[1]:
        raise ValueError(
            f"`query_embeds` and `gallery_embeds` must have the same dim, got {query_embeds.shape[1]} and "
            f"{gallery_embeds.shape[1]}"
        )


def exact_search(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    top_k: int,
    block_size: int = 65536,
    query_batch_size: int = 1024,
    query_exclude: torch.Tensor | None = None,
    gallery_exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Exact maximum-inner-product search (cosine similarity for L2-normalised embeddings), best first: the one top-k
    search of this package (the pipeline, the gallery index and the evaluation metrics all call it).

    The gallery is scored in blocks of `block_size` rows and queries in batches of `query_batch_size`, keeping a
    running top-k, so peak extra memory is `query_batch_size x block_size` scores whatever the gallery size (the
    gallery itself may live on another device or be memory-mapped; each block is moved to the query's device).

    query_embeds (`torch.FloatTensor` of shape `(num_queries, dim)`)
    gallery_embeds (`torch.FloatTensor` of shape `(gallery_size, dim)`)
    query_exclude (`torch.LongTensor` of shape `(num_queries,)`, *optional*) and gallery_exclude (`torch.LongTensor` of
        shape `(gallery_size,)`): given together, a gallery item whose code equals its query's code (both >= 0) is left
        out of that query's results, e.g. the query's own reference image.

    Returns `(scores, indices)`, both of shape `(num_queries, min(top_k, gallery_size))`; where exclusions leave fewer
    than `top_k` items, the missing places hold score `-inf` and index `-1` (as FAISS marks missing results).

    >>> import torch
    >>> gallery = torch.eye(3)
    >>> scores, indices = exact_search(torch.tensor([[0.0, 1.0, 0.0]]), gallery, top_k=2)
    >>> indices.tolist()
    [[1, 0]]
    >>> exact_search(torch.tensor([[0.0, 1.0, 0.0]]), gallery, 3, query_exclude=torch.tensor([1]),
    ...              gallery_exclude=torch.tensor([-1, 1, 1]))[1].tolist()
    [[0, -1, -1]]
    """
    check_embedding_pair(query_embeds, gallery_embeds)
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}")
    for name, value in (("block_size", block_size), ("query_batch_size", query_batch_size)):
        if value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value}")
    if (query_exclude is None) != (gallery_exclude is None):
        raise ValueError("`query_exclude` and `gallery_exclude` must be given together")
    if query_exclude is not None and (
        tuple(query_exclude.shape) != (query_embeds.shape[0],)
        or tuple(gallery_exclude.shape) != (gallery_embeds.shape[0],)
    ):
        raise ValueError(
            f"`query_exclude` must have shape ({query_embeds.shape[0]},) and `gallery_exclude` ({gallery_embeds.shape[0]},), "
            f"got {tuple(query_exclude.shape)} and {tuple(gallery_exclude.shape)}"
        )
    gallery_size = gallery_embeds.shape[0]
    if gallery_size == 0:
        raise ValueError("the gallery is empty: there is nothing to search")
    k = min(top_k, gallery_size)
    all_scores, all_indices = [], []
    for q_start in range(0, query_embeds.shape[0], query_batch_size):
        queries = query_embeds[q_start : q_start + query_batch_size]
        for g_start in range(0, gallery_size, block_size):
            block = gallery_embeds[g_start : g_start + block_size].to(device=queries.device, dtype=queries.dtype)
            scores = queries @ block.T
            if query_exclude is not None:
                codes = query_exclude[q_start : q_start + query_batch_size].to(queries.device)[:, None]
                block_codes = gallery_exclude[g_start : g_start + block_size].to(queries.device)[None, :]
                scores.masked_fill_((codes == block_codes) & (codes >= 0), float("-inf"))
            block_scores, block_indices = scores.topk(min(k, scores.shape[1]), dim=1)
            if g_start == 0:
                best_scores, best_indices = block_scores, block_indices
            else:
                merged_scores = torch.cat([best_scores, block_scores], dim=1)
                merged_indices = torch.cat([best_indices, block_indices + g_start], dim=1)
                best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
                best_indices = merged_indices.gather(1, order)
                del merged_scores, merged_indices
            # Free this block's score matrix before the next one is allocated: peak memory holds one block, not two.
            del scores, block_scores, block_indices
        if query_exclude is not None:
            best_indices = best_indices.masked_fill(best_scores == float("-inf"), -1)
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores), torch.cat(all_indices)


__all__ = ["check_embedding_pair", "exact_search"]
