import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def expected_ap(grad: torch.Tensor, rows: torch.Tensor, gamma: float) -> torch.Tensor:
    """The paper's formula computed independently in float64:
    M = G (Sigma + gamma * trace(Sigma)/d I)^-1 with Sigma = rows^T rows / n, via linalg.solve."""
    z = rows.double()
    d = z.shape[1]
    sigma = z.T @ z / z.shape[0]
    a = sigma + gamma * torch.trace(sigma) / d * torch.eye(d, dtype=torch.float64)
    # M A = G  <=>  A M^T = G^T (A symmetric)
    return torch.linalg.solve(a, grad.double().T).T


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())
