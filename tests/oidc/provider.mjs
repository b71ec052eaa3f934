// A real OpenID Connect provider for MedCLS's sign-in tests and for trying sign-in locally:
// the certified `oidc-provider` package with one client and three test users.
//
//   node tests/oidc/provider.mjs --port 9000 --redirect http://localhost:8501/oauth2callback
//
// Users sign in on the provider's own development login form with any password:
//   clinician  -> clinician@hospital.test
//   reviewer   -> reviewer@hospital.test
//   stranger   -> stranger@elsewhere.test   (not on the app's allow-list)
// Client: id "medcls", secret "medcls-test-secret". Test use only: keys are generated at
// start and nothing is stored.
import Provider from 'oidc-provider';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    port: { type: 'string', default: '9000' },
    host: { type: 'string', default: '127.0.0.1' },
    redirect: { type: 'string', multiple: true, default: ['http://localhost:8501/oauth2callback'] },
  },
});

const USERS = {
  clinician: { email: 'clinician@hospital.test', name: 'Test Clinician' },
  reviewer: { email: 'reviewer@hospital.test', name: 'Test Reviewer' },
  stranger: { email: 'stranger@elsewhere.test', name: 'Test Stranger' },
};

const issuer = `http://${values.host}:${values.port}`;
const provider = new Provider(issuer, {
  clients: [{
    client_id: 'medcls',
    client_secret: 'medcls-test-secret',
    redirect_uris: values.redirect,
    post_logout_redirect_uris: values.redirect,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  async findAccount(ctx, id) {
    const user = USERS[id];
    if (!user) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: user.email, email_verified: true, name: user.name };
      },
    };
  },
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'] },
  // the e-mail claims go into the ID token itself: Streamlit reads the user from it
  conformIdTokenClaims: false,
  cookies: { keys: ['medcls-test-cookie-key-not-secret'] },
  features: {
    devInteractions: { enabled: true }, // the built-in login form: any password
    rpInitiatedLogout: {
      enabled: true,
      // sign out at once (the default page asks "Do you want to sign-out?")
      async logoutSource(ctx, form) {
        ctx.body = `<!DOCTYPE html><html><head><title>Signing out</title></head><body>${form}
          <input type="hidden" name="logout" value="yes" form="op.logoutForm">
          <script>document.getElementById('op.logoutForm').submit()</script></body></html>`;
      },
    },
  },
  // the development login form asks for any login: refuse unknown users with a clear error
  async renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = `<!DOCTYPE html><html><head><title>Sign-in error</title></head><body>
      <h1>Sign-in error</h1><pre>${String(out.error)}: ${String(out.error_description || '')}</pre></body></html>`;
  },
});
provider.proxy = false;

provider.listen(Number(values.port), values.host, () => {
  console.log(`oidc-provider listening on ${issuer}`);
});
