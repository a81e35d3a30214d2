//! The device files the GPIO backend needs, and, when one cannot be opened, a message that
//! names the file, why, and the fix.
//!
//! rppal 0.22's `Gpio::new()` opens, read-write and in this order (its src/gpio.rs,
//! src/gpio/gpiomem/bcm.rs and rp1.rs, src/gpio/ioctl.rs `find_gpiochip`):
//!
//! 1. the GPIO registers: `/dev/gpiomem` on a Pi 1–4 (falling back to `/dev/mem`, which only
//!    root may open), `/dev/gpiomem0` on a Pi 5 (the RP1 chip);
//! 2. `/dev/gpiochip0`, `/dev/gpiochip1`, … in turn until one is labelled `pinctrl-bcm2835`,
//!    `pinctrl-bcm2711` or `pinctrl-rp1`; a missing or forbidden one before that ends the search.
//!    That is gpiochip0 on a Pi 1–4, and on a Pi 5 gpiochip0 since kernel 6.6.45
//!    (raspberrypi/linux#6144), gpiochip4 before.
//!
//! Its errors lose the detail: a permission error keeps only the path (not whether the file's
//! mode or the container's device cgroup said no), a missing file only "No such file or
//! directory". So after a failure the publisher opens the same files itself, in the same order,
//! and explains the first that fails with its real errno.

use std::{
    fmt,
    fs::OpenOptions,
    io,
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use nix::errno::Errno;

/// The highest gpiochip number rppal tries.
const LAST_CHIP: u32 = 255;

/// The first device file that could not be opened.
#[derive(Debug)]
pub struct Failure {
    /// The file, e.g. /dev/gpiochip0.
    pub path: PathBuf,
    /// What the kernel said.
    pub error: io::Error,
    /// For a gpiochip: how many before it opened (none of them being the Pi's GPIO controller).
    pub chips_before: u32,
}

/// Opens what rppal opens under `dev` (normally /dev), in its order, and returns the first
/// failure. `rp1`: a Pi 5, whose registers are gpiomem0. `missing_chip_is_the_cause`: whether
/// rppal failed with "not found", so that a gpiochip missing after others opened is the cause;
/// otherwise such a gap is where the search would have stopped anyway, not a failure.
pub fn probe(dev: &Path, rp1: bool, missing_chip_is_the_cause: bool) -> Option<Failure> {
    let open = |path: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(drop)
    };
    let registers = dev.join(if rp1 { "gpiomem0" } else { "gpiomem" });
    if let Err(error) = open(&registers) {
        // rppal falls back to /dev/mem on a Pi 1–4; if that works, the registers are fine.
        if rp1 || open(&dev.join("mem")).is_err() {
            return Some(Failure {
                path: registers,
                error,
                chips_before: 0,
            });
        }
    }
    for n in 0..=LAST_CHIP {
        let path = dev.join(format!("gpiochip{n}"));
        match open(&path) {
            Ok(()) => {}
            Err(error)
                if n > 0
                    && error.kind() == io::ErrorKind::NotFound
                    && !missing_chip_is_the_cause =>
            {
                return None;
            }
            Err(error) => {
                return Some(Failure {
                    path,
                    error,
                    chips_before: n,
                });
            }
        }
    }
    None
}

/// Who this process is, as the kernel checks file permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Identity {
    /// This process.
    pub fn current() -> Self {
        Self {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            groups: nix::unistd::getgroups()
                .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_default(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
        write!(
            f,
            "uid {}, gid {}, supplementary groups [{}]",
            self.uid,
            self.gid,
            groups.join(", ")
        )
    }
}

/// Where the gpio group id is set for Kubernetes.
const GROUP_SETTING: &str = "deploy/overlays/gpio-device-plugin/gpio-group.yaml";
/// What the device plugin must pass in.
const PLUGIN_FIX: &str = "in Kubernetes deploy with the gpio-device-plugin overlay \
     (deploy/overlays/gpio-device-plugin): its pod requests the devices from \
     smarter-device-manager (smarter-devices/gpiomem and smarter-devices/gpiochip0; Pi 5: \
     gpiomem0 and gpiochip0), and `kubectl describe node <pi>` must list them under Allocatable";

/// The message for `failure`: the file, what the kernel said, what it means here, the fix.
pub fn explain(failure: &Failure, who: &Identity) -> String {
    let path = failure.path.display();
    let facts = file_facts(&failure.path);
    let chip = failure
        .path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("gpiochip"));
    match failure.error.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOENT) if chip && failure.chips_before > 0 => format!(
            "{path} does not exist, and none of /dev/gpiochip0 to /dev/gpiochip{} is the Pi's \
             GPIO controller (rppal opens them in turn until one is labelled pinctrl-bcm2835, \
             pinctrl-bcm2711 or pinctrl-rp1). On a Pi 5 with a kernel before 6.6.45 the header's \
             GPIO is /dev/gpiochip4: update the kernel (6.6.45 and later make it gpiochip0), or \
             pass gpiochip0 to gpiochip4 into the container",
            failure.chips_before - 1
        ),
        Some(Errno::ENOENT) => format!(
            "{path} does not exist here: the device is not passed into this container, or this \
             is not a Raspberry Pi (or its kernel lacks the driver). Fix: {PLUGIN_FIX}; outside \
             a container check `ls -l {path}` on the Pi"
        ),
        Some(Errno::EACCES) => format!(
            "permission denied opening {path} ({facts}) for this process ({who}): {}. Fix: \
             give the process the file's group — `stat -c '%g %a' {path}` on the Pi shows the \
             group id to use (Raspberry Pi OS: group gpio, 997; Ubuntu: dialout, 20, with the \
             rpi.gpio-common package's udev rule) and the mode (0660 wanted; 0600 means no udev \
             rule gave the file a group). In Kubernetes set that id in {GROUP_SETTING} \
             (supplementalGroups); outside, `sudo usermod -aG <group> $USER` and log in again",
            why_denied(&failure.path, who)
        ),
        Some(Errno::EPERM) => format!(
            "the kernel refused to open {path} ({facts}) with EPERM, whatever the file's \
             permissions: the container's device cgroup does not allow this device (a hostPath \
             mount of /dev does not grant it). Fix: {PLUGIN_FIX}; the gpio-privileged overlay is \
             the last resort"
        ),
        Some(Errno::ENXIO | Errno::ENODEV) => format!(
            "{path} exists ({facts}) but no driver answers it ({}): the node is not the Pi model \
             this file belongs to, or its kernel lacks the driver",
            failure.error
        ),
        _ => format!("cannot open {path} ({facts}): {}", failure.error),
    }
}

/// Why the mode bits refuse `who` read-write access to `path`, in words.
fn why_denied(path: &Path, who: &Identity) -> String {
    let Ok(m) = std::fs::metadata(path) else {
        return "the file's owner, group or mode does not allow it".to_owned();
    };
    let in_group = m.gid() == who.gid || who.groups.contains(&m.gid());
    if m.uid() == who.uid {
        "the file's mode gives its owner, this process, no read-write access".to_owned()
    } else if in_group && m.mode() & 0o060 != 0o060 {
        format!(
            "the process is in the file's group {} but the mode gives that group no read-write \
             access",
            m.gid()
        )
    } else if in_group {
        format!(
            "the process is in the file's group {}, yet the kernel said no",
            m.gid()
        )
    } else {
        format!(
            "none of the process's groups is the file's group {}",
            m.gid()
        )
    }
}

/// `character device, owner uid 0 gid 997, mode 0660`, or why that is unknown.
fn file_facts(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "{}, owner uid {} gid {}, mode {:04o}",
            if m.file_type().is_char_device() {
                "character device"
            } else if m.is_dir() {
                "directory"
            } else {
                "not a device file"
            },
            m.uid(),
            m.gid(),
            m.mode() & 0o7777
        ),
        Err(e) => format!("cannot stat it: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// What `who` gets opening `path` read-write, for real: the open runs on a thread whose
    /// filesystem uid and gid are `who`'s (setfsuid drops the file capabilities of root, so
    /// the kernel checks the mode as for that user), and never changes the test process.
    fn open_as(path: &Path, uid: u32, gid: u32) -> io::Error {
        let path = path.to_owned();
        std::thread::spawn(move || {
            nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid));
            nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap_err()
        })
        .join()
        .unwrap()
    }

    fn devices(files: &[(&str, u32)]) -> tempfile::TempDir {
        let dev = tempfile::tempdir().unwrap();
        // The directory must be searchable by the unprivileged opener.
        std::fs::set_permissions(dev.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for (name, mode) in files {
            let path = dev.path().join(name);
            std::fs::write(&path, b"").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        dev
    }

    fn nobody() -> Identity {
        Identity {
            uid: 65532,
            gid: 65532,
            groups: vec![997],
        }
    }

    #[test]
    fn a_missing_device_says_it_is_not_passed_in_and_how_to_pass_it() {
        let dev = devices(&[("gpiochip0", 0o666)]);
        let failure = probe(dev.path(), false, true).unwrap();
        assert_eq!(failure.path, dev.path().join("gpiomem"));
        assert_eq!(failure.error.kind(), io::ErrorKind::NotFound);
        let text = explain(&failure, &nobody());
        eprintln!("{text}");
        assert!(text.contains("gpiomem does not exist here"), "{text}");
        assert!(text.contains("not passed into this container"), "{text}");
        assert!(text.contains("smarter-devices/gpiochip0"), "{text}");

        // The Pi 5's registers are gpiomem0; then gpiochip0 is the one missing.
        let dev = devices(&[("gpiomem0", 0o666)]);
        let failure = probe(dev.path(), true, true).unwrap();
        assert_eq!(failure.path, dev.path().join("gpiochip0"));
        assert!(explain(&failure, &nobody()).contains("gpiochip0 does not exist here"));
    }

    #[test]
    fn a_forbidden_device_names_the_file_its_group_and_mode_the_process_groups_and_the_setting() {
        if Identity::current().uid != 0 {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs the tests as root, which this test needs"
            );
            eprintln!("SKIPPED: needs root to open files as another user");
            return;
        }
        // gpiomem readable by its owner only (as without the udev rule), gpiochip0 fine.
        let dev = devices(&[("gpiomem", 0o600), ("gpiochip0", 0o666)]);
        let error = open_as(&dev.path().join("gpiomem"), 65532, 65532);
        assert_eq!(error.raw_os_error(), Some(Errno::EACCES as i32), "{error}");
        let failure = Failure {
            path: dev.path().join("gpiomem"),
            error,
            chips_before: 0,
        };
        let text = explain(&failure, &nobody());
        eprintln!("{text}");
        for needle in [
            &format!("permission denied opening {}", failure.path.display()),
            "owner uid 0 gid 0, mode 0600",
            "uid 65532, gid 65532, supplementary groups [997]",
            "none of the process's groups is the file's group 0",
            GROUP_SETTING,
            "997",
            "dialout",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from: {text}");
        }

        // Group gpio (997) but mode 000, as after `chmod 000`: the group is right, the mode not.
        let dev = devices(&[("gpiomem", 0o666), ("gpiochip0", 0o000)]);
        std::os::unix::fs::chown(dev.path().join("gpiochip0"), Some(0), Some(997)).unwrap();
        let error = open_as(&dev.path().join("gpiochip0"), 65532, 65532);
        assert_eq!(error.kind(), io::ErrorKind::PermissionDenied);
        let failure = Failure {
            path: dev.path().join("gpiochip0"),
            error,
            chips_before: 0,
        };
        let text = explain(&failure, &nobody());
        for needle in [
            "gpiochip0",
            "gid 997, mode 0000",
            "in the file's group 997 but the mode gives that group no read-write access",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from: {text}");
        }
    }

    #[test]
    fn the_device_cgroups_eperm_is_not_blamed_on_groups() {
        let dev = devices(&[("gpiomem", 0o660)]);
        // A device cgroup's refusal: EPERM from open(2), whatever the mode.
        let failure = Failure {
            path: dev.path().join("gpiomem"),
            error: io::Error::from_raw_os_error(Errno::EPERM as i32),
            chips_before: 0,
        };
        let text = explain(&failure, &nobody());
        eprintln!("{text}");
        assert!(text.contains("device cgroup"), "{text}");
        assert!(text.contains("gpio-device-plugin"), "{text}");
        assert!(!text.contains("supplementalGroups"), "{text}");
    }

    #[test]
    fn the_search_through_gpiochips_blames_a_gap_only_when_rppal_found_none() {
        // A Pi 5 before kernel 6.6.45 with only gpiochip0 passed in: rppal opens gpiochip0
        // (gpio-brcmstb, not the header), then finds no gpiochip1.
        let dev = devices(&[("gpiomem0", 0o666), ("gpiochip0", 0o666)]);
        let failure = probe(dev.path(), true, true).unwrap();
        assert_eq!(failure.path, dev.path().join("gpiochip1"));
        assert_eq!(failure.chips_before, 1);
        let text = explain(&failure, &nobody());
        assert!(
            text.contains("/dev/gpiochip4") && text.contains("6.6.45"),
            "{text}"
        );
        // When rppal failed otherwise, the end of the list is not the cause.
        assert!(probe(dev.path(), true, false).is_none());
    }

    #[test]
    fn dev_mem_stands_in_for_gpiomem_on_a_pi_4_but_not_on_a_pi_5() {
        let dev = devices(&[("mem", 0o666), ("gpiochip0", 0o666)]);
        assert!(probe(dev.path(), false, false).is_none());
        let failure = probe(dev.path(), true, false).unwrap();
        assert_eq!(failure.path, dev.path().join("gpiomem0"));
    }

    #[test]
    fn the_identity_lists_uid_gid_and_groups() {
        let who = Identity {
            uid: 65532,
            gid: 65532,
            groups: vec![997, 20],
        };
        assert_eq!(
            who.to_string(),
            "uid 65532, gid 65532, supplementary groups [997, 20]"
        );
        let me = Identity::current();
        assert_eq!(me.uid, nix::unistd::geteuid().as_raw());
    }
}
