//! `cargo xtask certs`: demo TLS certificates for trying the proxy locally.
//!
//! Self-signed RSA 2048 and ECDSA P-256 certificates for `localhost` and
//! `127.0.0.1`, made with the `openssl` CLI so that nothing but openssl is
//! needed and the same files can be made by hand with [`OPENSSL_COMMANDS`].
//! They are for demos and tests only: anyone can make the same kind.

use std::{fs, io::ErrorKind, path::Path, process::Command};

use anyhow::{Context, Result, bail};

/// Every file `run` writes; all present means there is nothing to do.
const FILES: [&str; 7] = [
    "rsa.crt",
    "rsa.key",
    "rsa.pem",
    "ecdsa.crt",
    "ecdsa.key",
    "ecdsa.pem",
    "server.pem",
];

/// The shell commands that make the same files as [`run`], run inside the
/// certificate directory. A test below keeps them in step with the code.
// Meant for the README: nothing in the binary may read it.
#[allow(dead_code)]
pub const OPENSSL_COMMANDS: &str = "\
openssl req -x509 -newkey rsa:2048 -nodes -keyout rsa.key -out rsa.crt -days 825 -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ecdsa.key -out ecdsa.crt -days 825 -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth
cat rsa.crt rsa.key > rsa.pem
cat ecdsa.crt ecdsa.key > ecdsa.pem
cp ecdsa.pem server.pem
";

/// Key types made, as (file stem, openssl arguments that make the key).
const KINDS: [(&str, &[&str]); 2] = [
    ("rsa", &["-newkey", "rsa:2048"]),
    (
        "ecdsa",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    ),
];

/// The `openssl req` arguments for one kind, with the key and certificate
/// written to `key` and `crt`.
fn req_args(newkey: &[&str], key: &str, crt: &str) -> Vec<String> {
    let mut args = vec!["req".to_owned(), "-x509".to_owned()];
    args.extend(newkey.iter().map(|s| (*s).to_owned()));
    args.extend(
        [
            "-nodes",
            "-keyout",
            key,
            "-out",
            crt,
            "-days",
            "825",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            // openssl's default config marks self-signed certificates CA:TRUE,
            // which rustls (webpki) refuses as a server certificate.
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ]
        .map(str::to_owned),
    );
    args
}

/// Writes the demo certificates into `dir`, unless all of them are there.
pub fn run(dir: &Path) -> Result<()> {
    if FILES.iter().all(|f| dir.join(f).is_file()) {
        println!(
            "certs: all demo certificates are present in {}, nothing to do \
             (delete one to make new ones)",
            dir.display()
        );
        return Ok(());
    }
    check_openssl()?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    // Make everything in a scratch directory and move it in at the end, so
    // that a failure half way leaves no mix of old and new files behind.
    let staging = dir.join(".certs-staging");
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot remove the leftover {}", staging.display()))?;
    }
    fs::create_dir(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let made = generate(&staging);
    let moved = made.and_then(|()| {
        for file in FILES {
            let to = dir.join(file);
            fs::rename(staging.join(file), &to)
                .with_context(|| format!("cannot move {file} into {}", to.display()))?;
        }
        Ok(())
    });
    // Best effort: the staging directory is only clutter if it stays.
    let _ = fs::remove_dir_all(&staging);
    moved?;

    println!(
        "certs: wrote {} to {} (self-signed for localhost and 127.0.0.1, 825 days)",
        FILES.join(", "),
        dir.display()
    );
    Ok(())
}

fn check_openssl() -> Result<()> {
    match Command::new("openssl").arg("version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => bail!(
            "`openssl version` failed: {}; reinstall openssl (`apt-get install openssl`)",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) if err.kind() == ErrorKind::NotFound => bail!(
            "the openssl command is not installed; install it (`apt-get install openssl`) \
             and run `cargo xtask certs` again"
        ),
        Err(err) => Err(err).context("cannot run openssl"),
    }
}

fn generate(dir: &Path) -> Result<()> {
    for (stem, newkey) in KINDS {
        let key = format!("{stem}.key");
        let crt = format!("{stem}.crt");
        let args = req_args(newkey, &key, &crt);
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .output()
            .context("cannot run openssl")?;
        if !out.status.success() {
            bail!(
                "`openssl {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // HAProxy-style bundle: the certificate, then its key, in one file.
        let mut pem = read(&dir.join(&crt))?;
        if !pem.ends_with(b"\n") {
            pem.push(b'\n');
        }
        pem.extend(read(&dir.join(&key))?);
        write(&dir.join(format!("{stem}.pem")), &pem)?;
    }
    let ecdsa = read(&dir.join("ecdsa.pem"))?;
    write(&dir.join("server.pem"), &ecdsa)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn commands_match_the_code() {
        for (stem, newkey) in KINDS {
            let line = format!(
                "openssl {}",
                req_args(newkey, &format!("{stem}.key"), &format!("{stem}.crt")).join(" ")
            );
            assert!(
                OPENSSL_COMMANDS.lines().any(|l| l == line),
                "OPENSSL_COMMANDS lacks: {line}"
            );
            assert!(OPENSSL_COMMANDS.contains(&format!("cat {stem}.crt {stem}.key > {stem}.pem")));
        }
        assert!(OPENSSL_COMMANDS.contains("cp ecdsa.pem server.pem"));
    }

    #[test]
    fn writes_then_skips_then_repairs() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!("xtask-certs-{}-{nanos}", std::process::id()));

        run(&dir).unwrap();
        for file in FILES {
            assert!(dir.join(file).is_file(), "{file} missing");
        }
        assert!(!dir.join(".certs-staging").exists());
        for stem in ["rsa", "ecdsa"] {
            let crt = fs::read_to_string(dir.join(format!("{stem}.crt"))).unwrap();
            let key = fs::read_to_string(dir.join(format!("{stem}.key"))).unwrap();
            let pem = fs::read_to_string(dir.join(format!("{stem}.pem"))).unwrap();
            assert!(crt.contains("BEGIN CERTIFICATE"));
            assert!(key.contains("PRIVATE KEY"));
            assert_eq!(pem, format!("{crt}{key}"));
            let text = Command::new("openssl")
                .args(["x509", "-noout", "-text", "-in"])
                .arg(dir.join(format!("{stem}.crt")))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&text.stdout);
            assert!(
                text.contains("DNS:localhost, IP Address:127.0.0.1"),
                "{text}"
            );
            assert!(text.contains("CA:FALSE"), "{text}");
        }
        let ecdsa = fs::read(dir.join("ecdsa.pem")).unwrap();
        assert_eq!(fs::read(dir.join("server.pem")).unwrap(), ecdsa);

        // All there: nothing is rewritten.
        run(&dir).unwrap();
        assert_eq!(fs::read(dir.join("ecdsa.pem")).unwrap(), ecdsa);

        // One missing: a whole new set.
        fs::remove_file(dir.join("rsa.key")).unwrap();
        run(&dir).unwrap();
        assert!(dir.join("rsa.key").is_file());
        assert_ne!(fs::read(dir.join("ecdsa.pem")).unwrap(), ecdsa);

        fs::remove_dir_all(&dir).unwrap();
    }
}
