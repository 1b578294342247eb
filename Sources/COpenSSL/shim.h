// Thin C helpers over OpenSSL 3 for what Swift cannot call directly
// (macros, variadic functions, OSSL_PARAM arrays). Only FleetCrypto imports this.
#include <openssl/evp.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/pem.h>
#include <openssl/ec.h>
#include <openssl/kdf.h>
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/param_build.h>
#include <openssl/bn.h>
#include <openssl/sha.h>
#include <openssl/hmac.h>
#include <string.h>

/// SHA-256 of a || b on a stack context: no allocation and no provider
/// dispatch. The low-level API is deprecated in OpenSSL 3 but runs the same
/// SHA-NI / AVX2 code; receivers hash one short message per arriving symbol.
static inline void fc_sha256_concat(const void *a, size_t a_len, const void *b, size_t b_len, unsigned char out[32]) {
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wdeprecated-declarations"
    SHA256_CTX c;
    SHA256_Init(&c);
    SHA256_Update(&c, a, a_len);
    SHA256_Update(&c, b, b_len);
    SHA256_Final(out, &c);
#pragma clang diagnostic pop
}

static inline const EVP_MD *fc_sha256(void) {
    // Explicitly fetched once: implicit fetches cost a lock per digest.
    static EVP_MD *md = NULL;
    if (md == NULL) { md = EVP_MD_fetch(NULL, "SHA256", NULL); }
    return md;
}

static inline int fc_hkdf_sha256(const unsigned char *ikm, size_t ikm_len,
                                 const unsigned char *salt, size_t salt_len,
                                 const unsigned char *info, size_t info_len,
                                 unsigned char *out, size_t out_len) {
    EVP_KDF *kdf = EVP_KDF_fetch(NULL, "HKDF", NULL);
    if (kdf == NULL) return 0;
    EVP_KDF_CTX *kctx = EVP_KDF_CTX_new(kdf);
    EVP_KDF_free(kdf);
    if (kctx == NULL) return 0;
    OSSL_PARAM params[5];
    int n = 0;
    params[n++] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)"SHA256", 0);
    params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)ikm, ikm_len);
    params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, (void *)salt, salt_len);
    params[n++] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, (void *)info, info_len);
    params[n] = OSSL_PARAM_construct_end();
    int ok = EVP_KDF_derive(kctx, out, out_len, params);
    EVP_KDF_CTX_free(kctx);
    return ok;
}

/// Builds a P-256 public key from an uncompressed SEC1 point (65 bytes).
static inline EVP_PKEY *fc_p256_public_from_point(const unsigned char *point, size_t len) {
    EVP_PKEY *pkey = NULL;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    if (ctx == NULL) return NULL;
    OSSL_PARAM params[3];
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *)"prime256v1", 0);
    params[1] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, (void *)point, len);
    params[2] = OSSL_PARAM_construct_end();
    if (EVP_PKEY_fromdata_init(ctx) <= 0 || EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) <= 0) {
        pkey = NULL;
    }
    EVP_PKEY_CTX_free(ctx);
    return pkey;
}

/// Builds a P-256 private key from its 32-byte scalar (public point derived).
static inline EVP_PKEY *fc_p256_private_from_scalar(const unsigned char *d, size_t len) {
    EVP_PKEY *pkey = NULL;
    BIGNUM *priv = BN_bin2bn(d, (int)len, NULL);
    EC_GROUP *group = EC_GROUP_new_by_curve_name(NID_X9_62_prime256v1);
    EC_POINT *pub = group ? EC_POINT_new(group) : NULL;
    unsigned char point[65];
    OSSL_PARAM_BLD *bld = NULL;
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    if (!priv || !pub || !EC_POINT_mul(group, pub, priv, NULL, NULL, NULL)) goto done;
    if (EC_POINT_point2oct(group, pub, POINT_CONVERSION_UNCOMPRESSED, point, 65, NULL) != 65) goto done;
    bld = OSSL_PARAM_BLD_new();
    if (!bld) goto done;
    OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0);
    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_PRIV_KEY, priv);
    OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, point, 65);
    params = OSSL_PARAM_BLD_to_param(bld);
    ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    if (!params || !ctx || EVP_PKEY_fromdata_init(ctx) <= 0 ||
        EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_KEYPAIR, params) <= 0) pkey = NULL;
done:
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    EC_POINT_free(pub);
    EC_GROUP_free(group);
    BN_clear_free(priv);
    return pkey;
}

/// Generates a P-256 key pair.
static inline EVP_PKEY *fc_p256_generate(void) {
    EVP_PKEY *pkey = NULL;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_EC, NULL);
    if (ctx == NULL) return NULL;
    if (EVP_PKEY_keygen_init(ctx) <= 0 ||
        EVP_PKEY_CTX_set_ec_paramgen_curve_nid(ctx, NID_X9_62_prime256v1) <= 0 ||
        EVP_PKEY_keygen(ctx, &pkey) <= 0) pkey = NULL;
    EVP_PKEY_CTX_free(ctx);
    return pkey;
}

/// Is this key on P-256?
static inline int fc_is_p256(const EVP_PKEY *pkey) {
    char name[64];
    size_t len = 0;
    if (!EVP_PKEY_is_a(pkey, "EC")) return 0;
    if (!EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, name, sizeof name, &len)) return 0;
    return strcmp(name, "prime256v1") == 0 || strcmp(name, "P-256") == 0;
}

/// Uncompressed SEC1 public point of an EC key (65 bytes for P-256).
static inline int fc_ec_public_point(const EVP_PKEY *pkey, unsigned char *out, size_t cap, size_t *len) {
    return EVP_PKEY_get_octet_string_param(pkey, OSSL_PKEY_PARAM_PUB_KEY, out, cap, len);
}

/// DER ECDSA-Sig-Value -> r||s, each left-padded to n bytes.
static inline int fc_ecdsa_der_to_raw(const unsigned char *der, size_t der_len, unsigned char *out, int n) {
    const unsigned char *p = der;
    ECDSA_SIG *sig = d2i_ECDSA_SIG(NULL, &p, (long)der_len);
    if (sig == NULL) return 0;
    const BIGNUM *r = NULL, *s = NULL;
    ECDSA_SIG_get0(sig, &r, &s);
    int ok = BN_bn2binpad(r, out, n) == n && BN_bn2binpad(s, out + n, n) == n;
    ECDSA_SIG_free(sig);
    return ok;
}

/// r||s -> DER ECDSA-Sig-Value. Returns the DER length, or 0.
static inline int fc_ecdsa_raw_to_der(const unsigned char *raw, int n, unsigned char *out, int cap) {
    ECDSA_SIG *sig = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(raw, n, NULL);
    BIGNUM *s = BN_bin2bn(raw + n, n, NULL);
    if (!sig || !r || !s || !ECDSA_SIG_set0(sig, r, s)) {
        ECDSA_SIG_free(sig); BN_free(r); BN_free(s); return 0;
    }
    int len = i2d_ECDSA_SIG(sig, NULL);
    if (len <= 0 || len > cap) { ECDSA_SIG_free(sig); return 0; }
    unsigned char *p = out;
    len = i2d_ECDSA_SIG(sig, &p);
    ECDSA_SIG_free(sig);
    return len;
}

/// 32-byte private scalar of a P-256 key.
static inline int fc_ec_private_scalar(const EVP_PKEY *pkey, unsigned char *out32) {
    BIGNUM *d = NULL;
    if (!EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_PRIV_KEY, &d)) return 0;
    int ok = BN_bn2binpad(d, out32, 32) == 32;
    BN_clear_free(d);
    return ok;
}

static inline int fc_cipher_allow_wrap(EVP_CIPHER_CTX *ctx) {
    EVP_CIPHER_CTX_set_flags(ctx, EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
    return 1;
}

static inline long fc_bio_get_mem(BIO *bio, char **data) { return BIO_get_mem_data(bio, data); }

/// HMAC-SHA256 (RFC 2104) one-shot; 1 on success.
static inline int fc_hmac_sha256(const unsigned char *key, size_t key_len, const unsigned char *data, size_t data_len, unsigned char out[32]) {
    unsigned int len = 0;
    return HMAC(fc_sha256(), key, (int)key_len, data, data_len, out, &len) != NULL && len == 32;
}
