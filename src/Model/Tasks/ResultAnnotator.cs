using PaliGemma.CpuOnly.Model.Imaging;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;

namespace PaliGemma.CpuOnly.Model.Tasks;

/// <summary>
/// Draws detect/segment results onto a copy of the image: masks alpha-blended, a 2-pixel box outline and a filled label
/// tag per object, one colour per object, text in a built-in bitmap font.
/// </summary>
public static class ResultAnnotator
{
    /// <summary>Opacity of mask tinting.</summary>
    public const float MaskAlpha = 0.45f;
    public const int OutlineWidth = 2;

    // Well separated, saturated colours; object i uses entry i mod length.
    private static readonly (byte R, byte G, byte B)[] s_palette =
    [
        (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
        (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128),
    ];

    public static (byte R, byte G, byte B) ColorOf(int objectIndex) => s_palette[objectIndex % s_palette.Length];

    /// <summary>Returns a new image; <paramref name="image"/> is not changed.</summary>
    /// <exception cref="ArgumentException">An object was parsed for a different image size.</exception>
    public static RgbImage Draw(RgbImage image, IReadOnlyList<DetectedObject> objects)
    {
        ArgumentNullException.ThrowIfNull(image);
        ArgumentNullException.ThrowIfNull(objects);
        foreach (var o in objects)
            if (o.ImageWidth != image.Width || o.ImageHeight != image.Height)
                throw new ArgumentException($"an object was parsed for a {o.ImageWidth}x{o.ImageHeight} image, the image is {image.Width}x{image.Height}", nameof(objects));
        var canvas = new RgbImage(image.Width, image.Height, (byte[])image.Pixels.Clone());

        // Masks first so outlines and labels stay crisp on top of them.
        for (int i = 0; i < objects.Count; i++)
            if (objects[i].Mask is { } mask) BlendMask(canvas, mask, ColorOf(i));
        for (int i = 0; i < objects.Count; i++) DrawOutline(canvas, PixelRect(objects[i], canvas), ColorOf(i));
        int scale = Math.Max(1, (int)Math.Round(Math.Min(image.Width, image.Height) / 320.0));
        for (int i = 0; i < objects.Count; i++)
        {
            string label = objects[i].Label.Length == 0 ? "?" : objects[i].Label;
            DrawTag(canvas, PixelRect(objects[i], canvas), label, ColorOf(i), scale);
        }
        return canvas;
    }

    /// <summary>Writes <paramref name="image"/> as an 8-bit RGB PNG.</summary>
    public static void SavePng(RgbImage image, string path)
    {
        ArgumentNullException.ThrowIfNull(image);
        ArgumentNullException.ThrowIfNull(path);
        using var png = Image.LoadPixelData<Rgb24>(image.Pixels, image.Width, image.Height);
        try
        {
            png.SaveAsPng(path);
        }
        catch (Exception e) when (e is DirectoryNotFoundException or UnauthorizedAccessException or IOException)
        {
            throw new IOException($"cannot write '{path}': {e.Message}", e);
        }
    }

    /// <summary>Inclusive pixel rectangle covering the float box, clamped to the image.</summary>
    private static (int X1, int Y1, int X2, int Y2) PixelRect(DetectedObject o, RgbImage canvas)
    {
        var b = o.BoxXyxy;
        int x1 = Math.Clamp((int)Math.Floor(b[0]), 0, canvas.Width - 1), y1 = Math.Clamp((int)Math.Floor(b[1]), 0, canvas.Height - 1);
        int x2 = Math.Clamp((int)Math.Ceiling(b[2]) - 1, x1, canvas.Width - 1), y2 = Math.Clamp((int)Math.Ceiling(b[3]) - 1, y1, canvas.Height - 1);
        return (x1, y1, x2, y2);
    }

    private static void BlendMask(RgbImage canvas, byte[] mask, (byte R, byte G, byte B) color)
    {
        var px = canvas.Pixels;
        for (int i = 0; i < mask.Length; i++)
        {
            if (mask[i] == 0) continue;
            int p = i * 3;
            px[p] = Mix(px[p], color.R);
            px[p + 1] = Mix(px[p + 1], color.G);
            px[p + 2] = Mix(px[p + 2], color.B);
        }

        static byte Mix(byte under, byte over) => (byte)Math.Round(under + (over - under) * MaskAlpha);
    }

    private static void DrawOutline(RgbImage canvas, (int X1, int Y1, int X2, int Y2) r, (byte R, byte G, byte B) color)
    {
        for (int t = 0; t < OutlineWidth; t++)
        {
            FillRect(canvas, r.X1, r.Y1 + t, r.X2, r.Y1 + t, color);
            FillRect(canvas, r.X1, r.Y2 - t, r.X2, r.Y2 - t, color);
            FillRect(canvas, r.X1 + t, r.Y1, r.X1 + t, r.Y2, color);
            FillRect(canvas, r.X2 - t, r.Y1, r.X2 - t, r.Y2, color);
        }
    }

    /// <summary>A filled tag with the label, above the box when there is room, else just inside its top edge.</summary>
    private static void DrawTag(RgbImage canvas, (int X1, int Y1, int X2, int Y2) r, string label, (byte R, byte G, byte B) color, int scale)
    {
        int pad = scale;
        int width = label.Length * BitmapFont.Advance * scale + pad;
        int height = BitmapFont.GlyphHeight * scale + 2 * pad;
        int top = r.Y1 - height >= 0 ? r.Y1 - height : r.Y1;
        int left = Math.Max(0, Math.Min(r.X1, canvas.Width - width));
        FillRect(canvas, left, top, left + width - 1, top + height - 1, color);

        // Black on light colours, white on dark ones (Rec. 601 luma).
        bool light = 0.299 * color.R + 0.587 * color.G + 0.114 * color.B > 150;
        var ink = light ? ((byte)0, (byte)0, (byte)0) : ((byte)255, (byte)255, (byte)255);
        int x = left + pad;
        foreach (char c in label)
        {
            var rows = BitmapFont.Rows(c);
            for (int row = 0; row < BitmapFont.GlyphHeight; row++)
                for (int col = 0; col < BitmapFont.GlyphWidth; col++)
                    if ((rows[row] & (1 << (BitmapFont.GlyphWidth - 1 - col))) != 0)
                    {
                        int gx = x + col * scale, gy = top + pad + row * scale;
                        FillRect(canvas, gx, gy, gx + scale - 1, gy + scale - 1, ink);
                    }
            x += BitmapFont.Advance * scale;
        }
    }

    /// <summary>Fills the inclusive rectangle, clipped to the image.</summary>
    private static void FillRect(RgbImage canvas, int x1, int y1, int x2, int y2, (byte R, byte G, byte B) color)
    {
        x1 = Math.Max(x1, 0);
        y1 = Math.Max(y1, 0);
        x2 = Math.Min(x2, canvas.Width - 1);
        y2 = Math.Min(y2, canvas.Height - 1);
        var px = canvas.Pixels;
        for (int y = y1; y <= y2; y++)
            for (int x = x1; x <= x2; x++)
            {
                int p = (y * canvas.Width + x) * 3;
                px[p] = color.R;
                px[p + 1] = color.G;
                px[p + 2] = color.B;
            }
    }
}
