//! Turning on etcd's authentication for a shardline cluster: a `root` user
//! (etcd needs one before `auth enable`), a user for shardline's programs
//! with a role that may read and write only the cluster's keys
//! (`/shardline/<cluster>/`), then `auth enable`. Used by `shardctl dev up
//! --etcd-auth` and the tests; a production etcd is set up the same way by
//! its operators (docs/SECURITY.md).

use etcd_client::{Client, Permission};
use settings::EtcdSettings;

use crate::store::{connect, with_timeout, EtcdPaths, StoreError};

/// Creates `root` (password `root_password`) and `user` (password
/// `password`, a role `user`-`cluster` granted read and write on the
/// cluster's keys), then enables auth. `etcd` must name no user: it is how
/// the etcd is reached before auth is on. When auth is already on (a dev
/// cluster started again on its kept data), does nothing.
pub async fn enable_auth(
    etcd: &EtcdSettings,
    root_password: &str,
    user: &str,
    password: &str,
    cluster: &str,
) -> Result<(), StoreError> {
    let mut client: Client = connect(etcd).await?;
    match with_timeout(client.user_add("root", root_password, None)).await {
        Ok(_) => {}
        // Without a token, an etcd with auth on refuses every request.
        Err(StoreError::Etcd(e)) if is_auth_refusal(&e) => return Ok(()),
        Err(e) => return Err(e),
    }
    with_timeout(client.user_grant_role("root", "root")).await?;
    let role = format!("{user}-{cluster}");
    with_timeout(client.role_add(role.as_str())).await?;
    let prefix = EtcdPaths::new(cluster).prefix().to_string();
    with_timeout(
        client.role_grant_permission(role.as_str(), Permission::read_write(prefix).with_prefix()),
    )
    .await?;
    with_timeout(client.user_add(user, password, None)).await?;
    with_timeout(client.user_grant_role(user, role.as_str())).await?;
    with_timeout(client.auth_enable()).await?;
    Ok(())
}

/// Whether etcd refused a request for want of a login (auth is on).
fn is_auth_refusal(error: &etcd_client::Error) -> bool {
    let text = error.to_string();
    text.contains("user name is empty")
        || text.contains("permission denied")
        || text.contains("invalid auth token")
        || text.contains("user name not found")
}
