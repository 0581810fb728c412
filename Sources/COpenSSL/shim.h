#pragma once
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <openssl/pem.h>
#include <openssl/evp.h>
#include <openssl/ec.h>
#include <openssl/rsa.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <stdlib.h>
#include <string.h>

/* OpenSSL's macros and variadic calls, which Swift cannot use, as small functions; and the
 * in-memory BIO a TLS stream runs on (see Sources/TLS/TLSStream.swift). */

static inline long vigil_ssl_ctx_set_mode(SSL_CTX *c, long mode) { return SSL_CTX_set_mode(c, mode); }
static inline int vigil_ssl_ctx_set_min_tls12(SSL_CTX *c) { return (int)SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION); }
static inline long vigil_ssl_ctx_set_max_cert_list(SSL_CTX *c, long n) { return SSL_CTX_set_max_cert_list(c, n); }
static inline long vigil_ssl_ctx_session_cache_off(SSL_CTX *c) { return SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF); }
static inline int vigil_ssl_set_sni(SSL *s, const char *name) { return (int)SSL_set_tlsext_host_name(s, name); }
static inline uint64_t vigil_ssl_op_no_ticket(void) { return SSL_OP_NO_TICKET; }
static inline void vigil_openssl_free(void *p) { OPENSSL_free(p); }
static inline EVP_PKEY *vigil_ec_p256_keygen(void) { return EVP_EC_gen("P-256"); }

/* A CRL's revoked serial numbers, and the certificates a peer sent after its own (OpenSSL's
 * stacks are macros). */
static inline int vigil_crl_revoked_count(X509_CRL *crl) {
    STACK_OF(X509_REVOKED) *r = X509_CRL_get_REVOKED(crl);
    return r ? sk_X509_REVOKED_num(r) : 0;
}
static inline const ASN1_INTEGER *vigil_crl_revoked_serial(X509_CRL *crl, int i) {
    return X509_REVOKED_get0_serialNumber(sk_X509_REVOKED_value(X509_CRL_get_REVOKED(crl), i));
}
static inline int vigil_peer_chain_count(const SSL *s) {
    STACK_OF(X509) *c = SSL_get_peer_cert_chain(s);
    return c ? sk_X509_num(c) : 0;
}
static inline X509 *vigil_peer_chain_cert(const SSL *s, int i) { return sk_X509_value(SSL_get_peer_cert_chain(s), i); }

/* A growable byte buffer the BIO writes ciphertext into (drained by Swift after each call). */
typedef struct {
    unsigned char *data;
    size_t len, cap;
} vigil_buf;

/* What one TLS stream's BIO reads from (the bytes just received) and writes to. */
typedef struct {
    const unsigned char *in;
    size_t in_len;
    vigil_buf *out; /* shared by the streams of one loop */
    int handshake_done;
    int renegotiation;
} vigil_tls_io;

static inline int vigil_bio_write(BIO *b, const char *src, int n) {
    vigil_tls_io *io = (vigil_tls_io *)BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (n <= 0) return 0;
    vigil_buf *o = io->out;
    if (o->len + (size_t)n > o->cap) {
        size_t cap = o->cap ? o->cap : 16384;
        while (cap < o->len + (size_t)n) cap *= 2;
        unsigned char *p = (unsigned char *)realloc(o->data, cap);
        if (!p) return -1;
        o->data = p;
        o->cap = cap;
    }
    memcpy(o->data + o->len, src, (size_t)n);
    o->len += (size_t)n;
    return n;
}

static inline int vigil_bio_read(BIO *b, char *dst, int n) {
    vigil_tls_io *io = (vigil_tls_io *)BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (io->in_len == 0) {
        BIO_set_retry_read(b);
        return -1;
    }
    size_t k = io->in_len < (size_t)n ? io->in_len : (size_t)n;
    memcpy(dst, io->in, k);
    io->in += k;
    io->in_len -= k;
    return (int)k;
}

static inline long vigil_bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
    (void)num; (void)ptr;
    vigil_tls_io *io = (vigil_tls_io *)BIO_get_data(b);
    switch (cmd) {
    case BIO_CTRL_FLUSH: return 1;
    case BIO_CTRL_PENDING: return io ? (long)io->in_len : 0;
    case BIO_CTRL_WPENDING: return 0;
    default: return 0;
    }
}

static inline int vigil_bio_create(BIO *b) { BIO_set_init(b, 1); return 1; }

static inline BIO_METHOD *vigil_bio_method(void) {
    static BIO_METHOD *m;
    if (!m) {
        m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "vigil-loop");
        BIO_meth_set_write(m, vigil_bio_write);
        BIO_meth_set_read(m, vigil_bio_read);
        BIO_meth_set_ctrl(m, vigil_bio_ctrl);
        BIO_meth_set_create(m, vigil_bio_create);
    }
    return m;
}

static inline void vigil_info_callback(const SSL *s, int where, int ret) {
    (void)ret;
    if (!(where & SSL_CB_HANDSHAKE_START)) return;
    BIO *b = SSL_get_rbio(s);
    vigil_tls_io *io = b ? (vigil_tls_io *)BIO_get_data(b) : NULL;
    /* TLS 1.3 signals its post-handshake messages this way too; only 1.2 renegotiates. */
    if (io && io->handshake_done && SSL_version(s) <= TLS1_2_VERSION) io->renegotiation = 1;
}

/* Attaches a new BIO over `io` to `s`, for reading and writing. */
static inline void vigil_ssl_attach_io(SSL *s, vigil_tls_io *io) {
    BIO *b = BIO_new(vigil_bio_method());
    BIO_set_data(b, io);
    SSL_set_bio(s, b, b);
    SSL_set_info_callback(s, vigil_info_callback);
}

/* ALPN on the server: h2 for gRPC, else http/1.1; a client offering neither goes on without. */
static inline int vigil_alpn_select(SSL *s, const unsigned char **out, unsigned char *outlen,
                                    const unsigned char *in, unsigned int inlen, void *arg) {
    (void)s; (void)arg;
    static const unsigned char ours[] = "\x02h2\x08http/1.1";
    unsigned char *sel = NULL;
    if (SSL_select_next_proto(&sel, outlen, ours, sizeof(ours) - 1, in, inlen) == OPENSSL_NPN_NEGOTIATED) {
        *out = sel;
        return SSL_TLSEXT_ERR_OK;
    }
    return SSL_TLSEXT_ERR_NOACK;
}

static inline void vigil_ssl_ctx_server_alpn(SSL_CTX *c) { SSL_CTX_set_alpn_select_cb(c, vigil_alpn_select, NULL); }

/* A self-signed certificate (etcd's --auto-tls): an ECDSA P-256 key, valid for `days` from now,
 * for the names in `san` ("IP:127.0.0.1,DNS:localhost"). Writes PEM files; 1 on success. */
static inline int vigil_make_self_signed(const char *cert_path, const char *key_path, const char *cn,
                                         const char *san, long days) {
    int ok = 0;
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    FILE *cf = NULL, *kf = NULL;
    if (!key || !x) goto done;
    X509_set_version(x, 2);
    BIGNUM *bn = BN_new();
    BN_rand(bn, 120, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY);
    BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x));
    BN_free(bn);
    X509_gmtime_adj(X509_getm_notBefore(x), 0);
    X509_gmtime_adj(X509_getm_notAfter(x), days * 24 * 3600);
    X509_set_pubkey(x, key);
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, (const unsigned char *)"etcd", -1, -1, 0);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
    X509_set_issuer_name(x, name);
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, x, x, NULL, NULL, 0);
    const char *exts[][2] = {{"subjectAltName", san}, {"keyUsage", "critical,digitalSignature,keyEncipherment"},
                             {"extendedKeyUsage", "serverAuth,clientAuth"}, {"basicConstraints", "critical,CA:FALSE"}};
    for (int i = 0; i < 4; i++) {
        X509_EXTENSION *e = X509V3_EXT_conf(NULL, &ctx, exts[i][0], exts[i][1]);
        if (!e) goto done;
        X509_add_ext(x, e, -1);
        X509_EXTENSION_free(e);
    }
    if (!X509_sign(x, key, EVP_sha256())) goto done;
    cf = fopen(cert_path, "w");
    kf = fopen(key_path, "w");
    if (!cf || !kf) goto done;
    if (!PEM_write_X509(cf, x)) goto done;
    if (!PEM_write_PrivateKey(kf, key, NULL, NULL, 0, NULL, NULL)) goto done;
    ok = 1;
done:
    if (cf) fclose(cf);
    if (kf) fclose(kf);
    X509_free(x);
    EVP_PKEY_free(key);
    return ok;
}
