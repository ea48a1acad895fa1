//! Registry authentication: the ping's `WWW-Authenticate` challenge, the
//! bearer token fetched from its realm (with the call's credentials), and
//! credentials put on requests. Never logs a credential.

use super::*;

/// `request` with `credentials` in its Authorization header.
pub(super) fn authorize(request: RequestBuilder, credentials: &Credentials) -> RequestBuilder {
    match credentials {
        Credentials::None => request,
        Credentials::Token { token, .. } | Credentials::Bearer(token) => request.bearer_auth(token),
        Credentials::Basic(user, password) => request.basic_auth(user, Some(password)),
    }
}

/// Pings `scheme://registry/v2/` and answers its auth challenge: a token
/// from the realm of a `Bearer` challenge (asked with the call's basic
/// credentials), the call's basic credentials for a `Basic` one, nothing
/// for none. A bearer token the caller gave is used as it is.
pub(super) async fn authenticate(
    http: &reqwest::Client,
    scheme: Scheme,
    registry: &str,
    reference: &Reference,
    auth: &RegistryAuth,
    need: Need,
    shows_client_certificate: bool,
) -> Result<Credentials, RegistryError> {
    let object = format!("registry {registry}");
    let url = format!("{}://{registry}/v2/", scheme.as_str());
    let response = match http.get(&url).send().await {
        Ok(response) => response,
        Err(err) => {
            let classified = classify_transport(&err, registry, &object);
            // A TLS 1.3 server that wants a client certificate ends the
            // connection after the handshake: the HTTP client sees it
            // closed, the probe reads the server's alert.
            let closed_after_connecting =
                matches!(classified, RegistryError::Unreachable { .. }) && !err.is_connect() && !err.is_timeout();
            if closed_after_connecting
                && scheme == Scheme::Https
                && !shows_client_certificate
                && tls_probe::refuses_without_client_certificate(registry).await
            {
                return Err(RegistryError::ClientCertificateRefused {
                    registry: registry.to_string(),
                    message: error_chain(&err),
                });
            }
            return Err(classified);
        }
    };
    if let RegistryAuth::Bearer(token) = auth {
        return Ok(Credentials::Bearer(token.clone()));
    }
    let challenge = response
        .headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    drop(response);
    match challenge.as_deref().map(parse_challenge) {
        Some(Some(challenge)) => {
            let token = fetch_token(http, &challenge, auth, reference, need, registry).await?;
            Ok(Credentials::Token { token, challenge })
        }
        // A Basic challenge, or none: the credentials, if any, go as they are.
        Some(None) | None => Ok(match auth {
            RegistryAuth::Basic(user, password) => Credentials::Basic(user.clone(), password.clone()),
            _ => Credentials::None,
        }),
    }
}

/// The realm and service of a `Bearer realm="...",service="..."` challenge;
/// None for any other scheme.
pub(super) fn parse_challenge(header: &str) -> Option<BearerChallenge> {
    let (scheme, params) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, remainder) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => match after.find(',') {
                Some(comma) => (&after[..comma], &after[comma..]),
                None => (after, ""),
            },
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value.to_string()),
            "service" => service = Some(value.to_string()),
            _ => {}
        }
        rest = remainder.trim_start().trim_start_matches(',').trim_start();
    }
    Some(BearerChallenge { realm: realm?, service })
}

/// A token for `need` on `reference`'s repository from the challenge's
/// realm, asked with the call's basic credentials (anonymous without). A
/// refusal is a permission error; the credentials never show in it.
pub(super) async fn fetch_token(
    http: &reqwest::Client,
    challenge: &BearerChallenge,
    auth: &RegistryAuth,
    reference: &Reference,
    need: Need,
    registry: &str,
) -> Result<String, RegistryError> {
    let object = format!("registry {registry}");
    let scope = format!("repository:{}:{}", reference.repository(), need.actions());
    let mut query = vec![("scope", scope.as_str())];
    if let Some(service) = &challenge.service {
        query.push(("service", service.as_str()));
    }
    let mut request = http.get(&challenge.realm).query(&query);
    if let RegistryAuth::Basic(user, password) = auth {
        request = request.basic_auth(user, Some(password));
    }
    let response = request
        .send()
        .await
        .map_err(|err| classify_transport(&err, registry, &object))?;
    let status = response.status();
    let body = read_small_body(response, MAX_SMALL_BODY_BYTES).await;
    if !status.is_success() {
        let reason = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_MESSAGE_BYTES)])
            .trim()
            .to_string();
        let message = format!(
            "the token service {} refused (status {status}): {reason}",
            challenge.realm
        );
        return Err(if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            status_error(status.as_u16(), &object, message)
        } else {
            RegistryError::Denied { object, message }
        });
    }
    #[derive(serde::Deserialize)]
    struct TokenAnswer {
        token: Option<String>,
        access_token: Option<String>,
    }
    let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|err| RegistryError::Registry {
        status: Some(status.as_u16()),
        object: object.clone(),
        message: format!("the token service {} answered no token: {err}", challenge.realm),
    })?;
    answer
        .token
        .or(answer.access_token)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| RegistryError::Registry {
            status: Some(status.as_u16()),
            object,
            message: format!("the token service {} answered no token", challenge.realm),
        })
}
