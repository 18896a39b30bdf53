//! Tests of the pod watch reactions.
