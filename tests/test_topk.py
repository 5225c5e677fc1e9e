"""The fixed-ratio rule shared by the baselines (EViT's top-k) and the learned trimmers run at a keep ratio."""
import torch

from smarttrim_cli.trim.topk import keep_topk


def test_keeps_the_top_share_of_live_tokens_with_or_without_a_reserved_cls():
    score = torch.tensor([[-5.0, 4.0, 3.0, 9.0, 1.0, 2.0]])
    alive = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 1.0]])  # token 3 is dead: never kept, however high its score
    # 5 live tokens at 0.5: ceil(2.5) = 3 places
    assert keep_topk(score, alive, 0.5).tolist() == [[True, True, True, False, False, False]]  # [CLS] takes one
    assert keep_topk(score, alive, 0.5, reserve_cls=False).tolist() == [[False, True, True, False, False, True]]
    assert keep_topk(score, alive, 0.0).tolist() == [[True, False, False, False, False, False]]  # at least one
    assert keep_topk(score, alive, 1.0).tolist() == (alive > 0).tolist()


def test_share_is_not_rounded_up_by_float_error():
    alive = torch.ones(1, 50)
    assert (torch.tensor(50.0) * 0.3).item() > 15  # float32: 15.000001
    assert int(keep_topk(torch.randn(1, 50), alive, 0.3).sum()) == 15
