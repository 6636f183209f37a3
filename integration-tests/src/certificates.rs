//! Throwaway TLS material for the fixtures (made with the `openssl` command): a CA, a server
//! certificate for `127.0.0.1` and a client certificate (common name `root`), all signed by it, valid
//! for two days.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::require_binary;

/// The PEM files in one directory.
#[derive(Debug, Clone)]
pub struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    /// Makes a CA and certificates signed by it in `dir` (created if missing).
    ///
    /// # Panics
    /// When `openssl` is missing or fails.
    pub fn make(dir: &Path) -> Certificates {
        let openssl = require_binary("openssl", "apt-get install openssl");
        std::fs::create_dir_all(dir).expect("create the certificates dir");
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .expect("write server.ext");
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")
            .expect("write client.ext");
        let mut steps: Vec<Vec<String>> = vec![words(
            "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=test-ca",
        )];
        for (name, subject) in [("server", "/CN=127.0.0.1"), ("client", "/CN=root")] {
            steps.push(words(&format!(
                "req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj {subject}"
            )));
            steps.push(words(&format!(
                "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem \
                 -days 2 -extfile {name}.ext"
            )));
        }
        for args in steps {
            let output = Command::new(&openssl)
                .args(&args)
                .current_dir(dir)
                .output()
                .expect("run openssl");
            assert!(
                output.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Certificates {
            dir: dir.to_path_buf(),
        }
    }

    /// The CA certificate clients trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server's certificate (for `127.0.0.1`).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// The server's private key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// The client's certificate (common name `root`).
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    /// The client's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }
}

/// The whitespace-separated words of `command` (no argument here has a space).
fn words(command: &str) -> Vec<String> {
    command.split_whitespace().map(str::to_owned).collect()
}
