//! Which crates' tasks are linked into this worker binary.
//!
//! `#[flotilla::task]` and `#[flotilla::actor]` register each function with
//! `inventory` in the crate that defines it, and those registrations reach a
//! binary only if that crate is linked into it. Rust links a dependency only
//! when the binary's code names it: listing the task crate in `Cargo.toml`
//! is not enough, so a binary holding only
//! `fn main() { flotilla::worker::main() }` gets none of its tasks, and
//! every submit to it would fail with `no worker provides task …`.
//!
//! The worker's `main` therefore checks what is linked before it connects:
//! [`check`] fails when no crate but Flotilla's registered anything, or
//! when a crate named in `flotilla::worker_main!(my_tasks)` registered
//! nothing. (Tested with rustc 1.95, debug, release and fat LTO: a
//! `use my_tasks as _;` anywhere in the binary, even inside `fn main`,
//! links all of `my_tasks`'s registrations; without it none is linked.)

use flotilla_task::actor::constructor_names;
use flotilla_task::registry::registry;
use std::collections::BTreeMap;

/// Crates whose registrations are Flotilla's own (the actor constructor
/// task, for instance), not the user's.
const FLOTILLA_CRATES: [&str; 2] = ["flotilla_worker", "flotilla"];

/// The crates that contribute tasks or actors to this binary, Flotilla's own
/// excluded, with how many registrations (tasks and actor constructors)
/// each contributes.
pub fn task_crates() -> BTreeMap<&'static str, usize> {
    let tasks = registry()
        .values()
        .map(|registration| registration.crate_name());
    let actors = constructor_names().map(|name| name.split("::").next().unwrap_or(name));
    let mut crates = BTreeMap::new();
    for crate_name in tasks.chain(actors) {
        if !FLOTILLA_CRATES.contains(&crate_name) {
            *crates.entry(crate_name).or_insert(0) += 1;
        }
    }
    crates
}

/// Why a worker binary refuses to start: it would serve none of the tasks
/// it was built for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// No task or actor of any crate but Flotilla's is registered.
    #[error(
        "this worker holds none of your tasks (only Flotilla's built-in ones), so every submit \
         to it would fail with `no worker provides task …`: the crate that defines your \
         `#[flotilla::task]` functions is not linked into this binary (a dependency that the \
         code never names is not linked). Name your task crates in the worker binary: \
         `flotilla::worker_main!(my_tasks);` instead of `fn main() {{ flotilla::worker::main() }}`"
    )]
    NoUserTasks,
    /// A crate named as a task crate registered no task and no actor.
    #[error(
        "`{crate_name}` is named as a task crate, but this binary holds no task or actor of it \
         (tasks are linked from: {linked}). Check that `{crate_name}` defines \
         `#[flotilla::task]` functions (not behind a disabled feature or `cfg`) and that it is \
         the crate's own name: a dependency renamed in Cargo.toml registers its tasks under \
         its package's name"
    )]
    MissingCrate {
        /// The crate as named.
        crate_name: String,
        /// The crates that did register tasks, comma-separated (or `no crate`).
        linked: String,
    },
}

/// Checks that this binary holds tasks of its own and at least one task or
/// actor of each crate in `task_crates` (names as written in Rust code;
/// `my-tasks` and `my_tasks` are the same crate). Returns the crates that
/// contribute tasks, with how many each.
pub fn check(task_crates_named: &[&str]) -> Result<BTreeMap<&'static str, usize>, LinkError> {
    check_against(task_crates(), task_crates_named)
}

fn check_against(
    linked: BTreeMap<&'static str, usize>,
    named: &[&str],
) -> Result<BTreeMap<&'static str, usize>, LinkError> {
    for crate_name in named {
        let crate_name = crate_name.replace('-', "_");
        if !linked.contains_key(crate_name.as_str()) {
            let list: Vec<&str> = linked.keys().copied().collect();
            return Err(LinkError::MissingCrate {
                crate_name,
                linked: if list.is_empty() {
                    "no crate".to_owned()
                } else {
                    list.join(", ")
                },
            });
        }
    }
    if linked.is_empty() {
        return Err(LinkError::NoUserTasks);
    }
    Ok(linked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linked(crates: &[(&'static str, usize)]) -> BTreeMap<&'static str, usize> {
        crates.iter().copied().collect()
    }

    #[test]
    fn a_binary_without_user_tasks_is_refused() {
        assert_eq!(check_against(linked(&[]), &[]), Err(LinkError::NoUserTasks));
        let message = LinkError::NoUserTasks.to_string();
        assert!(
            message.contains("flotilla::worker_main!(my_tasks);"),
            "{message}"
        );
    }

    #[test]
    fn every_named_crate_must_register_something() {
        let tasks = linked(&[("my_tasks", 3)]);
        assert_eq!(
            check_against(tasks.clone(), &["my_tasks"]),
            Ok(tasks.clone())
        );
        assert_eq!(
            check_against(tasks.clone(), &["my-tasks"]),
            Ok(tasks.clone())
        );
        let missing = check_against(tasks, &["my_tasks", "other"]).unwrap_err();
        assert_eq!(
            missing,
            LinkError::MissingCrate {
                crate_name: "other".into(),
                linked: "my_tasks".into()
            }
        );
        assert!(missing
            .to_string()
            .contains("tasks are linked from: my_tasks"));
        let none = check_against(linked(&[]), &["mine"]).unwrap_err();
        assert!(none.to_string().contains("no crate"), "{none}");
    }

    #[test]
    fn flotillas_own_registrations_are_not_user_tasks() {
        // This test binary links only the worker runtime: its actor
        // constructor task is registered, and counts for nobody.
        assert!(registry().contains_key(crate::actors::CREATE_ACTOR));
        assert!(task_crates().is_empty(), "{:?}", task_crates());
        assert_eq!(check(&[]), Err(LinkError::NoUserTasks));
    }
}
