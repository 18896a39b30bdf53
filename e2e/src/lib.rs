//! Test bed on real parts for imdsgate: a real kube-apiserver + etcd ([`cluster`]), the moto STS
//! emulator ([`sts`]) and network namespaces joined by veth pairs ([`netns`]). Every piece starts on
//! free loopback ports, is private to one test and is torn down on drop, even when the test fails.
#![forbid(unsafe_code)]

pub mod bed;
pub mod cluster;
pub mod components;
pub mod demo;
pub mod faults;
pub mod load;
pub mod manifests;
pub mod netns;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod real_cluster;
pub mod report;
pub mod seeded;
pub mod sts;
pub mod text;
pub mod tools;

pub use cluster::{Cluster, PodSpec};
pub use netns::{NodeNs, PodNs};
pub use pki::{CertPair, TestCa};
pub use sts::Sts;
pub use tools::e2e_enabled;
