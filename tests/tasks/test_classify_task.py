"""The classifier's evaluation: the confusion matrix and macro-F1, worked out by hand."""

import numpy as np

from transformer.tasks.classify import confusion_matrix, macro_f1


def test_confusion_matrix_and_macro_f1_by_hand():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    predicted = [0, 1, 0, 1, 2, 2, 2, 0, 2]
    matrix = confusion_matrix(labels, predicted, 3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    # class 0: P = 2/3, R = 2/3, F1 = 2/3; class 1: P = 1/2, R = 1/2, F1 = 1/2; class 2: P = 3/4, R = 3/4.
    assert abs(macro_f1(matrix) - (2 / 3 + 1 / 2 + 3 / 4) / 3) < 1e-12


def test_a_class_never_predicted_scores_zero():
    matrix = confusion_matrix([0, 0, 1, 1], [0, 0, 0, 0], 2)
    assert matrix.tolist() == [[2, 0], [2, 0]]
    # class 0: P = 1/2, R = 1, F1 = 2/3; class 1: nothing predicted, F1 = 0.
    assert abs(macro_f1(matrix) - (2 / 3) / 2) < 1e-12
    assert macro_f1(np.zeros((2, 2), np.int64)) == 0.0
