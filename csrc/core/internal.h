/* Internal helpers shared by every part of the C core, one header each: errors, logging and the clock
 * (error.h), the knobs, launcher, host and cores (env.h), hashes and secrets (secret.h). The floors above
 * include this one; core/'s own files include what they use. Not installed. */
#ifndef TP_INTERNAL_H
#define TP_INTERNAL_H

#include "env.h"
#include "error.h"
#include "secret.h"

#endif
