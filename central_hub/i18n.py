"""Every user-facing string of the hub's pages, Vietnamese first, English second.

Pages call ``t("key")``; a missing key is an error in tests (no page shows a raw key), and a
test checks that every key used by a template exists here in both languages. The language is
chosen by ``?lang=vi|en`` (remembered in the ``lang`` cookie); Vietnamese is the default.
"""

from __future__ import annotations

LANGS = ("vi", "en")
DEFAULT_LANG = "vi"

MESSAGES: dict[str, tuple[str, str]] = {
    # layout
    "app.name": ("isocam — Hệ thống giám sát camera", "isocam — camera surveillance"),
    "nav.sites": ("Điểm được xem", "My sites"),
    "nav.registrations": ("Duyệt đăng ký", "Registrations"),
    "nav.users": ("Tài khoản", "Accounts"),
    "nav.audit": ("Nhật ký kiểm toán", "Audit log"),
    "nav.login": ("Đăng nhập", "Log in"),
    "nav.logout": ("Đăng xuất", "Log out"),
    "nav.register": ("Đăng ký tài khoản", "Request an account"),
    "nav.switch_lang": ("English", "Tiếng Việt"),
    "footer.notice": (
        "Hình ảnh giám sát là thông tin được bảo vệ theo quy định. "
        "Mọi truy cập đều được ghi nhật ký.",
        "Surveillance footage is protected by law. Every access is logged.",
    ),
    # login
    "login.title": ("Đăng nhập", "Log in"),
    "login.email": ("Thư điện tử công vụ", "Official e-mail"),
    "login.password": ("Mật khẩu", "Password"),
    "login.submit": ("Đăng nhập", "Log in"),
    "login.failed": (
        "Đăng nhập không thành công: sai thông tin, hoặc tài khoản đang tạm khoá sau nhiều lần "
        "nhập sai. Vui lòng thử lại sau ít phút.",
        "Login failed: wrong credentials, or the account is locked for a while after repeated "
        "failures. Please try again in a few minutes.",
    ),
    "login.rate_limited": (
        "Quá nhiều lần đăng nhập sai từ địa chỉ này. Vui lòng thử lại sau.",
        "Too many failed logins from this address. Please try again later.",
    ),
    "login.activated": (
        "Tài khoản đã được kích hoạt. Hãy đăng nhập.",
        "Your account is active. Please log in.",
    ),
    "login.logged_out": ("Bạn đã đăng xuất.", "You have logged out."),
    "login.expired": (
        "Phiên làm việc đã hết hạn. Hãy đăng nhập lại.",
        "Your session has expired. Please log in again.",
    ),
    # TOTP
    "totp.title": ("Mã xác thực hai lớp", "Two-factor code"),
    "totp.code": (
        "Mã 6 chữ số trong ứng dụng xác thực",
        "6-digit code from your authenticator app",
    ),
    "totp.submit": ("Xác nhận", "Confirm"),
    "totp.failed": ("Mã không đúng hoặc đã được dùng.", "The code is wrong or was already used."),
    "totp.enrol_title": ("Thiết lập xác thực hai lớp", "Set up two-factor authentication"),
    "totp.enrol_intro": (
        "Tài khoản của bạn được xem hình ảnh camera nên bắt buộc dùng mã xác thực hai lớp. "
        "Thêm khoá dưới đây vào ứng dụng xác thực (Google Authenticator, FreeOTP, …) rồi nhập "
        "mã 6 chữ số mà ứng dụng hiển thị.",
        "Your account may see camera footage, so a second factor is required. Add the key below "
        "to an authenticator app (Google Authenticator, FreeOTP, …) and enter the 6-digit code "
        "it shows.",
    ),
    "totp.secret": ("Khoá bí mật", "Secret key"),
    "totp.uri": ("Liên kết otpauth (dán vào ứng dụng)", "otpauth link (paste into the app)"),
    "totp.enrolled": (
        "Đã thiết lập xác thực hai lớp. Hãy đăng nhập.",
        "Two-factor authentication is set up. Please log in.",
    ),
    # registration
    "register.title": ("Đăng ký tài khoản", "Request an account"),
    "register.intro": (
        "Điền theo mẫu đăng ký chính thức. Yêu cầu được một quản trị tài khoản đề xuất và một "
        "quản trị khác phê duyệt; sau đó bạn nhận liên kết kích hoạt.",
        "Fill in the official form. One account administrator proposes the request and another "
        "approves it; you then receive an activation link.",
    ),
    "register.full_name": ("Họ và tên", "Full name"),
    "register.title_field": ("Chức vụ", "Title"),
    "register.unit": ("Đơn vị công tác", "Unit"),
    "register.phone": ("Số điện thoại", "Phone"),
    "register.email": ("Thư điện tử công vụ", "Official e-mail"),
    "register.role": ("Vai trò đề nghị", "Role asked for"),
    "register.scope_kind": ("Phạm vi", "Scope"),
    "register.province": ("Tỉnh/thành phố", "Province"),
    "register.district": ("Quận/huyện", "District"),
    "register.authority": ("Cơ quan quản lý", "Managing authority"),
    "register.site_kind": ("Loại điểm", "Site kind"),
    "register.operator": ("Nhà mạng", "Operator"),
    "register.site_id": ("Mã điểm", "Site id"),
    "register.purpose": ("Mục đích sử dụng", "Purpose"),
    "register.submit": ("Gửi đăng ký", "Submit"),
    "register.done": (
        "Đã nhận yêu cầu số {request_id}. Quản trị tài khoản sẽ xem xét.",
        "Request {request_id} received. Account administrators will review it.",
    ),
    "register.rate_limited": (
        "Quá nhiều yêu cầu từ địa chỉ này. Vui lòng thử lại sau.",
        "Too many requests from this address. Please try again later.",
    ),
    "scope.nation": ("Toàn quốc", "Nationwide"),
    "scope.operator": ("Theo nhà mạng", "One operator"),
    "scope.province": ("Một tỉnh/thành phố", "One province"),
    "scope.province_district": ("Tỉnh + quận/huyện", "Province + district"),
    "scope.province_authority": ("Tỉnh + cơ quan quản lý", "Province + authority"),
    "scope.province_kind": ("Tỉnh + loại điểm", "Province + site kind"),
    "scope.site": ("Một điểm", "One site"),
    # field errors
    "error.required": ("Bắt buộc nhập.", "Required."),
    "error.too_long": ("Quá dài.", "Too long."),
    "error.control_chars": ("Có ký tự không hợp lệ.", "Contains invalid characters."),
    "error.phone_invalid": ("Số điện thoại không hợp lệ.", "Not a valid phone number."),
    "error.email_invalid": ("Địa chỉ thư không hợp lệ.", "Not a valid e-mail address."),
    "error.email_domain": (
        "Phải là thư điện tử công vụ ({domains}).",
        "Must be an official e-mail address ({domains}).",
    ),
    "error.role_invalid": ("Vai trò không hợp lệ.", "Not a valid role."),
    "error.scope_invalid": (
        "Phạm vi chưa đủ thông tin hoặc không hợp lệ.",
        "The scope is incomplete or invalid.",
    ),
    "error.password_short": ("Mật khẩu quá ngắn (ít nhất {n} ký tự).", "Too short (at least {n})."),
    "error.password_weak": ("Mật khẩu quá dễ đoán.", "Too easy to guess."),
    "error.password_mismatch": ("Hai mật khẩu không khớp.", "The passwords differ."),
    "error.email_taken": (
        "Đã có tài khoản với địa chỉ thư này.",
        "An account with this e-mail already exists.",
    ),
    "error.pending_exists": (
        "Đã có yêu cầu đang chờ duyệt cho địa chỉ thư này.",
        "A request for this e-mail is already pending.",
    ),
    "error.same_admin": (
        "Người đề xuất không được tự phê duyệt; cần một quản trị khác.",
        "The proposer cannot approve; another administrator must.",
    ),
    "error.out_of_scope": (
        "Việc này nằm ngoài phạm vi quản lý của bạn.",
        "This is outside your scope.",
    ),
    "error.bad_state": (
        "Yêu cầu không còn ở trạng thái cho phép thao tác này.",
        "The request is no longer in a state that allows this.",
    ),
    "error.token_invalid": (
        "Liên kết kích hoạt không hợp lệ, đã dùng hoặc đã hết hạn.",
        "The activation link is invalid, used or expired.",
    ),
    "error.self": ("Không thể thao tác trên chính tài khoản của bạn.", "Not on your own account."),
    "error.generic": ("Không thực hiện được.", "That could not be done."),
    "error.forbidden": ("Bạn không có quyền truy cập nội dung này.", "You may not access this."),
    "error.csrf": (
        "Biểu mẫu đã hết hạn hoặc không hợp lệ. Hãy tải lại trang và thử lại.",
        "The form expired or is invalid. Reload the page and try again.",
    ),
    "error.not_found": ("Không tìm thấy.", "Not found."),
    "error.title": ("Lỗi", "Error"),
    # activation
    "activate.title": ("Kích hoạt tài khoản", "Activate your account"),
    "activate.intro": ("Chọn mật khẩu cho tài khoản {email}.", "Choose a password for {email}."),
    "activate.password": ("Mật khẩu mới", "New password"),
    "activate.password2": ("Nhập lại mật khẩu", "Repeat the password"),
    "activate.submit": ("Kích hoạt", "Activate"),
    # admin
    "admin.registrations": ("Yêu cầu đăng ký", "Account requests"),
    "admin.none": ("Không có yêu cầu nào đang chờ.", "No pending requests."),
    "admin.state": ("Trạng thái", "State"),
    "admin.state.submitted": ("Chờ đề xuất", "Awaiting proposal"),
    "admin.state.proposed": ("Chờ phê duyệt", "Awaiting approval"),
    "admin.state.approved": ("Đã duyệt", "Approved"),
    "admin.state.rejected": ("Từ chối", "Rejected"),
    "admin.proposed_by": ("Người đề xuất", "Proposed by"),
    "admin.propose": ("Đề xuất", "Propose"),
    "admin.approve": ("Phê duyệt", "Approve"),
    "admin.reject": ("Từ chối", "Reject"),
    "admin.reject_note": ("Lý do từ chối", "Reason for rejection"),
    "admin.approved_title": ("Đã phê duyệt", "Approved"),
    "admin.approved_link": (
        "Gửi liên kết kích hoạt dùng một lần này cho {email} qua kênh công vụ (hết hạn {expires}):",
        "Send this one-time activation link to {email} through an official channel "
        "(expires {expires}):",
    ),
    "admin.users": ("Tài khoản trong phạm vi của bạn", "Accounts in your scope"),
    "admin.disable": ("Khoá tài khoản", "Disable"),
    "admin.enable": ("Mở khoá tài khoản", "Enable"),
    "admin.disabled": ("Đã khoá", "Disabled"),
    "admin.active": ("Hoạt động", "Active"),
    "admin.reason": ("Lý do", "Reason"),
    "admin.grants": ("Quyền", "Grants"),
    "admin.done": ("Đã thực hiện.", "Done."),
    # sites
    "sites.title": ("Các điểm bạn được xem", "Sites you may see"),
    "sites.none": ("Bạn chưa được cấp quyền xem điểm nào.", "You have no sites."),
    "sites.count": ("{n} điểm", "{n} sites"),
    "sites.id": ("Mã điểm", "Site id"),
    "sites.name": ("Tên", "Name"),
    "sites.province": ("Tỉnh/TP", "Province"),
    "sites.district": ("Quận/huyện", "District"),
    "sites.kind": ("Loại", "Kind"),
    "sites.authority": ("Cơ quan quản lý", "Authority"),
    "sites.operator": ("Nhà mạng", "Operator"),
    "sites.live": ("Xem video", "Footage"),
    "sites.yes": ("Có", "Yes"),
    "sites.no": ("Không", "No"),
    "sites.disabled": ("ngừng hoạt động", "disabled"),
    # audit
    "audit.title": ("Nhật ký kiểm toán", "Audit log"),
    "audit.filter": ("Lọc", "Filter"),
    "audit.since": ("Từ ngày", "Since (date)"),
    "audit.action": ("Hành động", "Action"),
    "audit.site": ("Điểm", "Site"),
    "audit.seq": ("Số", "No."),
    "audit.time": ("Thời điểm (giờ Việt Nam)", "Time (Vietnam, UTC+7)"),
    "audit.user": ("Người thực hiện", "Who"),
    "audit.source": ("Địa chỉ", "Source"),
    "audit.camera": ("Camera", "Camera"),
    "audit.range": ("Khoảng thời gian", "Time range"),
    "audit.outcome": ("Kết quả", "Outcome"),
    "audit.reason": ("Lý do", "Reason"),
    "audit.allowed": ("cho phép", "allowed"),
    "audit.denied": ("từ chối", "denied"),
    "audit.older": ("Cũ hơn", "Older"),
    "audit.scope_note": (
        "Chỉ hiển thị các bản ghi trong phạm vi của bạn.",
        "Only records within your scope are shown.",
    ),
    "audit.none": ("Không có bản ghi.", "No records."),
}


def t(key: str, lang: str = DEFAULT_LANG, **values: object) -> str:
    """The text for `key` in `lang` (Vietnamese for anything but ``en``), formatted."""
    vi, en = MESSAGES[key]
    text = en if lang == "en" else vi
    return text.format(**values) if values else text


def pick_lang(query_value: str | None, cookie_value: str | None) -> str:
    """?lang= wins, then the cookie, then Vietnamese."""
    for value in (query_value, cookie_value):
        if value in LANGS:
            return value
    return DEFAULT_LANG
