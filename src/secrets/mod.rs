//! Secrets providers: encrypted SQLite and Kubernetes Secrets.
