//! Tenant isolation (SPEC §1, §7): the same key from two tenants is two intents, whether
//! the tenant comes from a header or from a hash of the credential.

use serde_json::json;

use crate::support::{Gateway, Upstream, client, idem_log, send};

#[tokio::test]
async fn tenants_named_by_a_header_never_share_records() {
    let upstream = Upstream::start().await;
    let config = r#"
        [[routes]]
        name = "orders"
        path = "/orders"
        tenant = { header = "X-Tenant-ID" }
    "#;
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let post = |tenant: &str| {
        http.post(gateway.url("/orders"))
            .header("Idempotency-Key", "shared-key")
            .header("X-Tenant-ID", tenant)
            .json(&json!({ "amount": 1 }))
    };

    let acme = send(post("acme")).await;
    let globex = send(post("globex")).await;
    for reply in [&acme, &globex] {
        assert_eq!(reply.status, 201, "{reply:?}");
        assert!(!reply.replayed(), "{reply:?}");
    }
    assert_ne!(acme.body, globex.body);
    assert_eq!(upstream.calls_for("shared-key").await, 2);

    let acme_again = send(post("acme")).await;
    assert!(acme_again.replayed(), "{acme_again:?}");
    assert_eq!(acme_again.body, acme.body, "each tenant gets its own answer");
    let globex_again = send(post("globex")).await;
    assert_eq!(globex_again.body, globex.body);
    assert_eq!(upstream.calls_for("shared-key").await, 2);

    for tenant in ["acme", "globex"] {
        let record = gateway.record_of("orders", tenant, "shared-key").await.expect("a record per tenant");
        assert_eq!(record["tenant"], tenant, "{record}");
    }

    // Without the header, the credential names the tenant.
    let credential = http
        .post(gateway.url("/orders"))
        .header("Idempotency-Key", "shared-key")
        .header("Authorization", "Bearer acme")
        .json(&json!({ "amount": 1 }));
    let credential = send(credential).await;
    assert!(!credential.replayed(), "a credential is not the tenant header's value: {credential:?}");
    assert_eq!(upstream.calls_for("shared-key").await, 3);
    let listed = send(http.get(gateway.admin("/v1/records?scope=orders"))).await.json();
    let hashed = listed["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["tenant"].as_str().is_some_and(|t| t.starts_with("h:")));
    assert_eq!(hashed.count(), 1, "{listed}");
}

#[tokio::test]
async fn tenants_named_by_their_credential_never_share_records() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "").await;
    let http = client();
    let post = |credential: Option<&str>| {
        let request =
            http.post(gateway.url("/orders")).header("Idempotency-Key", "shared-key").json(&json!({ "amount": 1 }));
        match credential {
            Some(credential) => request.header("Authorization", credential),
            None => request,
        }
    };

    let alice = send(post(Some("Bearer alice-secret"))).await;
    let bob = send(post(Some("Bearer bob-secret"))).await;
    let anonymous = send(post(None)).await;
    for reply in [&alice, &bob, &anonymous] {
        assert_eq!(reply.status, 201, "{reply:?}");
        assert!(!reply.replayed(), "{reply:?}");
    }
    let alice_again = send(post(Some("Bearer alice-secret"))).await;
    assert!(alice_again.replayed(), "{alice_again:?}");
    assert_eq!(alice_again.body, alice.body);
    assert_eq!(upstream.calls_for("shared-key").await, 3);

    let listed = send(http.get(gateway.admin("/v1/records?scope=default"))).await;
    assert!(!listed.text().contains("secret"), "credentials are never stored: {listed:?}");
    let mut tenants: Vec<String> = listed.json()["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["tenant"].as_str().expect("a tenant").to_owned())
        .collect();
    tenants.sort();
    assert_eq!(tenants.len(), 3, "{listed:?}");
    assert_eq!(tenants[0], "", "no credential: the empty tenant");
    assert!(tenants[1].starts_with("h:") && tenants[2].starts_with("h:"), "{tenants:?}");
    assert_ne!(tenants[1], tenants[2]);
}

/// Isolation holds on every path that names a record: the admin API and `idem log` reach a
/// tenant's record only with its tenant, and forgetting one tenant's record leaves the
/// other's answer in place (it still replays).
#[tokio::test]
async fn the_admin_api_and_idem_log_keep_tenants_apart() {
    let upstream = Upstream::start().await;
    let config = "[[routes]]\nname = \"orders\"\npath = \"/orders\"\ntenant = { header = \"X-Tenant-ID\" }\n";
    let gateway = Gateway::start(&upstream.url(), config).await;
    let http = client();
    let post = |tenant: &str| {
        http.post(gateway.url("/orders"))
            .header("Idempotency-Key", "k-1")
            .header("X-Tenant-ID", tenant)
            .json(&json!({ "tenant": tenant }))
    };
    let acme = send(post("acme")).await;
    let globex = send(post("globex")).await;
    assert_eq!((acme.status, globex.status), (201, 201));

    // Admin API: listing by tenant, showing without the tenant, forgetting one tenant's.
    let listed = send(http.get(gateway.admin("/v1/records?scope=orders&tenant=acme"))).await.json();
    let tenants: Vec<&str> =
        listed["records"].as_array().expect("records").iter().filter_map(|r| r["tenant"].as_str()).collect();
    assert_eq!(tenants, ["acme"], "{listed}");
    let no_tenant = send(http.get(gateway.admin("/v1/records/orders/k-1"))).await;
    assert_eq!(no_tenant.status, 404, "no tenant is the empty tenant, which has no k-1: {no_tenant:?}");
    let shown = send(http.get(gateway.admin("/v1/records/orders/k-1?tenant=globex"))).await.json();
    assert_eq!(shown["tenant"], "globex");
    assert!(!shown.to_string().contains("acme"), "globex's record says nothing of acme's: {shown}");
    let forgotten = send(http.delete(gateway.admin("/v1/records/orders/k-1?tenant=globex"))).await;
    assert_eq!(forgotten.status, 204, "{forgotten:?}");
    let acme_again = send(post("acme")).await;
    assert!(acme_again.replayed(), "acme's record is untouched: {acme_again:?}");
    assert_eq!(acme_again.body, acme.body);

    // idem log: the same rules on the store file.
    let store = gateway.store_url().to_owned();
    let shown = idem_log(&store, &["show", "--scope", "orders", "--key", "k-1", "--json"]);
    assert_eq!(shown.code, Some(1), "no tenant given: not found: {shown:?}");
    let shown = idem_log(&store, &["show", "--scope", "orders", "--key", "k-1", "--tenant", "acme", "--json"]);
    assert_eq!(shown.json()["tenant"], "acme", "{shown:?}");
    let listed = idem_log(&store, &["list", "--tenant", "globex", "--json"]).json();
    assert_eq!(listed["records"].as_array().map(Vec::len), Some(0), "globex's record was forgotten: {listed}");
    let removed = idem_log(&store, &["rm", "--scope", "orders", "--key", "k-1", "--tenant", "globex"]);
    assert_eq!(removed.code, Some(1), "nothing of globex's is left to remove: {removed:?}");
    let still = send(post("acme")).await;
    assert!(still.replayed() && still.body == acme.body, "{still:?}");
    assert_eq!(upstream.calls_for("k-1").await, 2, "one execution per tenant");
}
