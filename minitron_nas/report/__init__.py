"""Reports: the markdown report and the plotly dashboards of a run folder."""
