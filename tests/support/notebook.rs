//! Notebooks for tests, built from code cell sources.

use serde_json::{Value, json};

/// An nbformat 4.5 notebook of code cells (source strings), kernel python3.
pub fn ipynb(cells: &[&str]) -> String {
    let cells: Vec<Value> = cells
        .iter()
        .enumerate()
        .map(|(i, src)| {
            json!({"cell_type": "code", "id": format!("c{i}"), "metadata": {}, "execution_count": null,
                   "outputs": [], "source": src})
        })
        .collect();
    json!({"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
           "nbformat": 4, "nbformat_minor": 5})
    .to_string()
}
