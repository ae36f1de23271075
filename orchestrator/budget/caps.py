"""The budget's hard caps as one table: the config key that sets each, its unit, where the
plan, the planned step and the ledger hold its amount, and how its figures are written."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cap:
    name: str  # what is capped: the plan's `totals` key
    key: str  # budget.<key> in the config; the key of the plan's budget check
    unit: str  # "$" goes before a figure, any other unit after it
    step_field: str  # the StageRates field with one planned step's amount
    spent_field: str  # the ledger Spend field with the amount spent
    exact_spec: str  # format of the plan's figures
    brief_spec: str  # format of the running budget's messages

    def limit(self, budget) -> float | None:
        """The cap set in a BudgetConfig (None: not set)."""
        return getattr(budget, self.key)

    def per_step(self, rates) -> float:
        """One step's amount in StageRates (at the stage's seq_len)."""
        return getattr(rates, self.step_field)

    def spent(self, spend) -> float:
        """The amount spent in a ledger Spend."""
        return getattr(spend, self.spent_field)

    def exact(self, value: float) -> str:
        """A figure as the plan writes it: cents, every digit of a token count."""
        return self._with_unit(format(value, self.exact_spec))

    def brief(self, value: float) -> str:
        """A figure as the running budget writes it: 4 significant digits, whole dollars
        from $1000 on (`g` would switch to an exponent there)."""
        return self._with_unit(format(value, self.brief_spec if self.unit != "$" or value < 1000 else ",.0f"))

    def _with_unit(self, number: str) -> str:
        return f"${number}" if self.unit == "$" else f"{number} {self.unit}"


USD = Cap("usd", "max_usd", "$", "step_usd", "cost_usd", exact_spec=",.2f", brief_spec=",.4g")
FLOPS = Cap("flops", "max_flops", "FLOPs", "step_flops", "flops", exact_spec=".4g", brief_spec=".4g")
TOKENS = Cap("tokens", "max_tokens", "tokens", "step_tokens", "tokens", exact_spec=",.0f", brief_spec=".4g")
# In this order everywhere: the plan's budget check, fitting, the run's warnings.
CAPS: tuple[Cap, ...] = (USD, FLOPS, TOKENS)
