"""What the record says: tables, statistics, plots and reports. Reads tracking; never imports torch."""
