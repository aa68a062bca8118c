"""A checkpoint's metrics on a prepared split, and the tables and plots of every report."""
