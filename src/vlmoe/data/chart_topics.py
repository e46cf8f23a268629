"""What the synthetic charts are about: titles, labels, units and plausible value ranges."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Topic:
    titles: tuple[str, ...]
    x_label: str
    y_label: str
    unit: str
    value_range: tuple[float, float]
    categories: tuple[str, ...] | str  # "years" for a run of consecutive years
    series_names: tuple[str, ...]
    x_label_histogram: str

    def as_shares(self) -> Topic:
        """The same topic shown as percentage shares (pie charts)."""
        return replace(self, unit="%", value_range=(5.0, 40.0), y_label="Share")


REGIONS = ("North", "South", "East", "West", "Central", "Coastal", "Mountain", "Islands", "Metro")
COUNTRIES = ("Brazil", "Canada", "Chile", "Egypt", "France", "India", "Japan", "Kenya", "Mexico", "Norway")
PRODUCTS = ("Laptops", "Phones", "Tablets", "Cameras", "Monitors", "Printers", "Speakers", "Watches")
SECTORS = ("Energy", "Retail", "Health", "Finance", "Transport", "Tourism", "Farming", "Mining")

TOPICS: tuple[Topic, ...] = (
    Topic(
        ("Annual revenue", "Revenue by year", "Company revenue"),
        "Year",
        "Revenue ($M)",
        "$",
        (20, 900),
        "years",
        ("Revenue", "Costs", "Profit", "Online", "In-store"),
        "Revenue band ($M)",
    ),
    Topic(
        ("Unemployment rate", "Jobless rate by country", "Unemployment"),
        "Country",
        "Rate (%)",
        "%",
        (2, 25),
        COUNTRIES,
        ("Men", "Women", "Youth", "Adults"),
        "Rate band (%)",
    ),
    Topic(
        ("Units sold per product", "Product sales", "Sales volume"),
        "Product",
        "Units sold (k)",
        "k",
        (5, 400),
        PRODUCTS,
        ("Q1", "Q2", "Q3", "Q4"),
        "Units (k)",
    ),
    Topic(
        ("Average rainfall", "Rainfall by region", "Yearly rainfall"),
        "Region",
        "Rainfall (mm)",
        "",
        (100, 2500),
        REGIONS,
        ("2021", "2022", "2023", "2024"),
        "Rainfall (mm)",
    ),
    Topic(
        ("Population", "Population growth", "Residents over time"),
        "Year",
        "Population (M)",
        "M",
        (1, 120),
        "years",
        ("Urban", "Rural", "Total"),
        "Population (M)",
    ),
    Topic(
        ("Investment by sector", "Sector investment", "Capital spending"),
        "Sector",
        "Investment ($M)",
        "$",
        (10, 600),
        SECTORS,
        ("Public", "Private", "Foreign"),
        "Investment ($M)",
    ),
    Topic(
        ("Website visits", "Monthly visitors", "Traffic"),
        "Year",
        "Visits (k)",
        "k",
        (50, 5000),
        "years",
        ("Desktop", "Mobile", "Tablet"),
        "Visits (k)",
    ),
    Topic(
        ("Customer satisfaction", "Satisfaction score", "Survey results"),
        "Region",
        "Satisfied (%)",
        "%",
        (30, 98),
        REGIONS,
        ("Store", "Online", "Phone"),
        "Score band (%)",
    ),
)

# Colour-blind-safe and familiar palettes; each chart uses one.
PALETTES: tuple[tuple[str, ...], ...] = (
    ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#332288", "#117733"),
    ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"),
    ("#0077bb", "#33bbee", "#009988", "#ee7733", "#cc3311", "#ee3377", "#bbbbbb", "#000000", "#ddaa33"),
    ("#264653", "#2a9d8f", "#e9c46a", "#f4a261", "#e76f51", "#8ab17d", "#b56576", "#6d597a", "#355070"),
)
